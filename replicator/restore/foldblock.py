"""The fold of one segment block: the innermost loop of restore, compaction and drills.

``fold_block(raw, lo, hi, cut_ms, stop_ms, rank, out, keys, keep_record, last_hdr,
last_hcount, odd) -> (n, status, stopped, last_hdr, last_hcount)`` walks the records of an
uncompressed block payload (docs/FORMAT.md §2.3) and stores in ``out`` the last change per
key (see :data:`replicator.restore.replay.Change`), reading only the envelope's ``key``,
``op`` and ``version``:

* records with ``offset < lo`` or a null value are skipped; ``offset >= hi`` ends the block
  (``status`` 1);
* with ``stop_ms``, the first record with a later timestamp ends the partition (``status``
  2, ``stopped`` = its offset); with ``cut_ms``, later records are skipped;
* ``n`` counts the records read (before the ``keys`` filter);
* ``last_hdr``/``last_hcount`` carry the previous record's encoded headers across blocks:
  publishers send the same headers on every record, so they are compared, not decoded, and
  the winners of a run share one bytes object;
* ``odd(value, offset) -> (key, is_delete, version)`` decodes a value the scanner does not
  handle itself, or raises :class:`~replicator.errors.CorruptSegmentError`.

Two implementations with the same results: :func:`fold_block_py`, the reference, and the
native ``replicator.restore._fold`` (C, built at install; about ten times faster) used when
it is importable. Tests run both over the same blocks, hostile ones included.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from typing import Any

import msgspec

from replicator.segment import format as fmt


class _Head(msgspec.Struct, gc=False):
    """The envelope fields replay needs; everything else is skipped by the decoder."""

    key: str
    op: str
    version: int | None = None


decode_head = msgspec.json.Decoder(_Head).decode

Odd = Callable[[bytes, int], tuple[str, bool, int | None]]
FoldResult = tuple[int, int, int | None, bytes, int]
FoldBlock = Callable[
    [bytes, int, int, int | None, int | None, int, dict[str, Any], Collection[str] | None,
     bool, bytes, int, Odd],
    FoldResult,
]

#: ``status`` values
CONTINUE, END, STOPPED = 0, 1, 2


def fold_block_py(
    raw: bytes, lo: int, hi: int, cut_ms: int | None, stop_ms: int | None, rank: int,
    out: dict[str, Any], keys: Collection[str] | None, keep_record: bool,
    last_hdr: bytes, last_hcount: int, odd: Odd,
) -> FoldResult:
    """The reference implementation (see the module docstring)."""
    unpack = fmt.RECORD_HEADER.unpack_from
    rsize = fmt.RECORD_HEADER.size
    name_unpack = fmt.HEADER_NAME.unpack_from
    nsize = fmt.HEADER_NAME.size
    hval_unpack = fmt.HEADER_VALUE.unpack_from
    hsize = fmt.HEADER_VALUE.size
    decode = decode_head
    n = 0
    pos = 0
    size = len(raw)
    while pos < size:
        off, ts, _tt, klen, vlen, hcount = unpack(raw, pos)
        pos += rsize
        kbytes: bytes | None = None
        if klen >= 0:
            if keep_record:
                kbytes = raw[pos : pos + klen]
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
                start = pos
                for _ in range(hcount):
                    pos += nsize + name_unpack(raw, pos)[0]
                    (vl,) = hval_unpack(raw, pos)
                    pos += hsize + (vl if vl > 0 else 0)
                last_hdr = raw[start:pos]
                last_hcount = hcount
        if pos > size:
            raise ValueError(f"record framing: the record at offset {off} runs beyond the "
                             "payload")
        if off < lo or value is None:
            continue
        if off >= hi:
            return n, END, None, last_hdr, last_hcount
        if stop_ms is not None and ts > stop_ms:
            return n, STOPPED, off, last_hdr, last_hcount
        if cut_ms is not None and ts > cut_ms:
            continue
        n += 1
        try:
            head = decode(value)
            key, is_delete, version = head.key, head.op == "delete", head.version
        except msgspec.DecodeError:
            key, is_delete, version = odd(value, off)
        if keys is not None and key not in keys:
            continue
        out[key] = (-1 if version is None else version, ts, rank, off,
                    None if is_delete else value, kbytes,
                    last_hdr if keep_record and hcount else b"")
    return n, CONTINUE, None, last_hdr, last_hcount


FoldLatest = Callable[
    [bytes, int, int, int | None, int, dict[str, Any], Collection[str] | None, bool, Odd, Any],
    int,
]


def fold_block_latest_py(
    raw: bytes, lo: int, hi: int, cut_ms: int | None, rank: int, out: dict[str, Any],
    keys: Collection[str] | None, keep_record: bool, odd: Odd, seen: Any = None,
) -> int:
    """Newest first (the reference): a change is stored only for a key not yet in ``out``.

    Called on a partition's blocks from the newest back, the first change met for a key is
    its last one -- the same state :func:`fold_block_py` reaches going forward, where each
    older change costs a new value. Records outside ``[lo, hi)``, with a null value or a
    timestamp above ``cut_ms`` are skipped; returns the records read (before ``keys``).

    ``seen`` (from :func:`new_keyset`; the native form only, ignored here) remembers the keys
    decided so far -- stored or filtered out by ``keys`` -- as raw bytes, so that an older
    record of one is skipped without a str or a dict lookup. One per ``out``."""
    unpack = fmt.RECORD_HEADER.unpack_from
    rsize = fmt.RECORD_HEADER.size
    name_unpack = fmt.HEADER_NAME.unpack_from
    nsize = fmt.HEADER_NAME.size
    hval_unpack = fmt.HEADER_VALUE.unpack_from
    hsize = fmt.HEADER_VALUE.size
    recs = []
    pos = 0
    size = len(raw)
    while pos < size:
        off, ts, _tt, klen, vlen, hcount = unpack(raw, pos)
        kpos = pos + rsize
        vpos = kpos + max(klen, 0)
        hpos = vpos + max(vlen, 0)
        pos = hpos
        for _ in range(hcount):
            pos += nsize + name_unpack(raw, pos)[0]
            (vl,) = hval_unpack(raw, pos)
            pos += hsize + (vl if vl > 0 else 0)
        if pos > size:
            raise ValueError(f"record framing: the record at offset {off} runs beyond the "
                             "payload")
        recs.append((off, ts, klen, vlen, hcount, kpos, vpos, hpos, pos))
    n = 0
    for off, ts, klen, vlen, hcount, kpos, vpos, hpos, end in reversed(recs):
        if off < lo or off >= hi or vlen < 0 or (cut_ms is not None and ts > cut_ms):
            continue
        n += 1
        value = raw[vpos : vpos + vlen]
        try:
            head = decode_head(value)
            key, is_delete, version = head.key, head.op == "delete", head.version
        except msgspec.DecodeError:
            key, is_delete, version = odd(value, off)
        if key in out or (keys is not None and key not in keys):
            continue
        out[key] = (-1 if version is None else version, ts, rank, off,
                    None if is_delete else value,
                    raw[kpos : kpos + klen] if keep_record and klen >= 0 else None,
                    raw[hpos:end] if keep_record and hcount else b"")
    return n


def _fold_mod() -> Any:
    from replicator.restore import _fold  # type: ignore[attr-defined]

    return _fold


def _load_native() -> FoldBlock | None:
    if os.environ.get("REPLICATOR_NO_NATIVE"):
        return None
    try:
        from replicator.restore import _fold  # type: ignore[attr-defined]
    except ImportError:
        return None
    native: FoldBlock = _fold.fold_block
    return native


#: the native fold when it was built (``REPLICATOR_NO_NATIVE=1`` forces the reference)
native_fold_block: FoldBlock | None = _load_native()
fold_block: FoldBlock = native_fold_block or fold_block_py
native_fold_block_latest: FoldLatest | None = (
    None if native_fold_block is None else getattr(_fold_mod(), "fold_block_latest", None))
fold_block_latest: FoldLatest = native_fold_block_latest or fold_block_latest_py


def _merge_changes_py(merged: dict[str, Any], local: dict[str, Any],
                      beats: Callable[[Any, Any], bool]) -> None:
    for key, change in local.items():
        cur = merged.get(key)
        if cur is None or beats(change, cur):
            merged[key] = change


#: replay's cross-partition merge: for each key of ``local``, its change goes into
#: ``merged`` when ``merged`` has none or ``beats(change, current)`` (native when built)
merge_changes: Callable[[dict[str, Any], dict[str, Any], Callable[[Any, Any], bool]], None] = (
    _merge_changes_py if native_fold_block is None
    else getattr(_fold_mod(), "merge_changes", _merge_changes_py))


def new_keyset() -> Any:
    """A ``seen`` set for one newest-first fold (``None`` on the reference path)."""
    if native_fold_block_latest is None:
        return None
    return getattr(_fold_mod(), "keyset", lambda: None)()
