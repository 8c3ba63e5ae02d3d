"""Writing and reading one snapshot file (format: :mod:`replicator.snapshot.format`).

:class:`SnapshotFileWriter` takes entries already sorted by ``(key, partition)`` and refuses
anything else, so an unsorted input can never produce a file whose index lies.
:class:`SnapshotFileReader` checks every block it returns and finds a key's block from the
sparse index without reading other blocks. With a sealing keyring the writer produces an
encrypted (format 2) file; the reader opens one with the keyring it is given (by default
the process's installed keyring) -- an encrypted file cannot even be opened without its key,
because the footer index holds keys of the data.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import os
from collections.abc import Iterator
from hashlib import blake2b
from pathlib import Path
from typing import Any

from replicator import crypto
from replicator.crypto import INSTALLED, KeyringArg
from replicator.errors import CorruptSnapshotError
from replicator.snapshot import format as sfmt
from replicator.snapshot.format import BlockRef, Entry, Sealing

#: Uncompressed bytes per block: large enough for lz4 to compress well, small enough that a
#: point look-up reads little.
BLOCK_TARGET = 256 * 1024


class SnapshotFileWriter:
    """Append sorted entries; :meth:`finish` writes footer and trailer and fsyncs.

    Invariant: ``(key, partition)`` strictly increases across :meth:`add` calls (checked).
    ``keyring`` (by default the process's sealing keyring) makes the file encrypted; its
    active key's id is :attr:`key_id`.
    """

    def __init__(self, path: Path, meta: dict[str, Any], *,
                 keyring: KeyringArg = INSTALLED) -> None:
        self.path = path
        sealer = crypto.for_writing(keyring)
        #: id of the key that seals the file (None: not encrypted)
        self.key_id = None if sealer is None else sealer.active
        header = sfmt.encode_file_header(meta, self.key_id)
        self._sealing = (None if sealer is None
                         else Sealing(sealer, sfmt.file_context(header)))
        self._f = path.open("xb")
        self._pos = 0
        self._write(header)
        self._buf: list[bytes] = []
        self._buf_len = 0
        self._buf_entries = 0
        self._first: str | None = None
        self._last: str | None = None
        self._last_part = -1
        self.blocks: list[BlockRef] = []
        self.entries = 0
        self._content = blake2b(digest_size=32)

    def _write(self, data: bytes) -> None:
        self._f.write(data)
        self._pos += len(data)

    def add(self, key: str, partition: int, offset: int, ts: int, version: int,
            value: bytes | None, kafka_key: bytes | None, headers: bytes) -> None:
        last = self._last
        if last is not None and (key < last or (key == last and partition <= self._last_part)):
            raise ValueError(f"snapshot entries out of order: {key!r}/{partition} after "
                             f"{last!r}/{self._last_part}")
        if key != last and self._buf_len >= BLOCK_TARGET:
            self._flush()  # only between keys: a key's entries never straddle blocks
        enc = sfmt.encode_entry(key.encode(), partition, offset, ts, version, value,
                                kafka_key, headers)
        self._buf.append(enc)
        self._buf_len += len(enc)
        self._buf_entries += 1
        if self._first is None:
            self._first = key
        self._last = key
        self._last_part = partition
        self.entries += 1

    def flush_block(self) -> None:
        """End the current block (the next :meth:`add` starts a new one)."""
        self._flush()

    def _flush(self) -> None:
        if not self._buf_entries:
            return
        raw = b"".join(self._buf)
        self._content.update(raw)
        block = sfmt.encode_block(raw, self._buf_entries, position=self._pos,
                                  sealing=self._sealing)
        assert self._first is not None and self._last is not None
        self.blocks.append(BlockRef(self._pos, len(block) - sfmt.BLOCK_HEADER.size,
                                    self._buf_entries, self._first, self._last))
        self._write(block)
        self._buf, self._buf_len, self._buf_entries, self._first = [], 0, 0, None

    @property
    def content_hash(self) -> str:
        """BLAKE2b-256 over the uncompressed block payloads written so far, in order: a
        re-read that computes the same value has read back exactly these entries."""
        return self._content.hexdigest()

    def finish(self, summary: dict[str, Any]) -> int:
        """Write the footer (index + ``summary``) and trailer, fsync, close; return size.
        Call :meth:`flush_block` first when the summary needs :attr:`content_hash`."""
        self._flush()
        footer_pos = self._pos
        footer = sfmt.encode_footer(self.blocks, summary, footer_pos=footer_pos,
                                    sealing=self._sealing)
        self._write(footer)
        self._write(sfmt.encode_trailer(footer_pos, footer))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self._pos

    def abort(self) -> None:
        self._f.close()
        self.path.unlink(missing_ok=True)


class SnapshotFileReader:
    """Random access to one complete snapshot file. Use as a context manager.

    An encrypted file is opened with ``keyring`` (by default the installed one); without
    its key, opening raises :class:`~replicator.errors.KeyNotFoundError`."""

    def __init__(self, path: Path, *, name: str | None = None,
                 keyring: KeyringArg = INSTALLED) -> None:
        self.path = path
        self.name = name or str(path)
        self._file = path.open("rb")
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            if self.size == 0:
                raise CorruptSnapshotError(self.name, 0, "empty file")
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self.meta, self.data_start, encrypted = sfmt.decode_file_header(
                self._mm[:min(self.size, 1 << 16)], self.name)
            #: id of the key the file names in its header (None: not encrypted)
            self.key_id: str | None = str(self.meta.get("key_id")) if encrypted else None
            self._sealing = (Sealing(crypto.for_reading(keyring),
                                     sfmt.file_context(self._mm[:self.data_start]))
                             if encrypted else None)
            self.blocks, self.summary, self.data_end = sfmt.decode_footer(
                self._mm, self.size, self.name, self._sealing)
        except BaseException:
            with contextlib.suppress(AttributeError):
                self._mm.close()
            self._file.close()
            raise
        self._first_keys = [b.first_key for b in self.blocks]
        for b in self.blocks:
            if not (self.data_start <= b.position and b.position + b.size <= self.data_end):
                raise CorruptSnapshotError(self.name, b.position, "block outside the data")

    def close(self) -> None:
        self._mm.close()
        self._file.close()

    def __enter__(self) -> SnapshotFileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def block_payloads(self) -> Iterator[tuple[BlockRef, bytes]]:
        for b in self.blocks:
            yield b, sfmt.decode_block(self._mm, b, self.name, self._sealing)

    def _entries(self, b: BlockRef, raw: bytes) -> list[Entry]:
        try:
            return list(sfmt.iter_entries(raw))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptSnapshotError(self.name, b.position,
                                       f"bad entry framing: {exc}") from None

    def entry_blocks(self) -> Iterator[tuple[BlockRef, list[Entry]]]:
        """Each block with its decoded entries, in file order (every check applied)."""
        for b, raw in self.block_payloads():
            yield b, self._entries(b, raw)

    def __iter__(self) -> Iterator[Entry]:
        """Every entry in ``(key, partition)`` order."""
        for _b, entries in self.entry_blocks():
            yield from entries

    def lookup(self, key: str) -> list[Entry]:
        """The entries of ``key`` (one per partition it occurs in); reads one block."""
        i = bisect.bisect_right(self._first_keys, key) - 1
        if i < 0 or key > self.blocks[i].last_key:
            return []
        b = self.blocks[i]
        raw = sfmt.decode_block(self._mm, b, self.name, self._sealing)
        return [e for e in self._entries(b, raw) if e[0] == key]

    def verify(self) -> tuple[int, str]:
        """Check every block, the entry order and the index; return the entry count and the
        content hash (see :attr:`SnapshotFileWriter.content_hash`)."""
        content = blake2b(digest_size=32)
        n = 0
        prev: tuple[str, int] | None = None
        for b, raw in self.block_payloads():
            content.update(raw)
            entries = self._entries(b, raw)
            for e in entries:
                cur = (e[0], e[1])
                if prev is not None and cur <= prev:
                    raise CorruptSnapshotError(self.name, b.position,
                                               f"entries out of order at key {e[0]!r}")
                prev = cur
            k = len(entries)
            if k != b.entries or not entries or (entries[0][0], entries[-1][0]) != (
                    b.first_key, b.last_key):
                raise CorruptSnapshotError(self.name, b.position,
                                           "block contents disagree with the footer index")
            n += k
        if n != int(self.summary.get("entries", n)):
            raise CorruptSnapshotError(self.name, self.data_end,
                                       f"footer says {self.summary.get('entries')} entries, "
                                       f"the blocks hold {n}")
        return n, content.hexdigest()
