"""The native block fold (``replicator.restore._fold``) against the Python reference: same
state, same counts, same stop points, same errors, on generated and hostile blocks."""

from __future__ import annotations

import json
import os
import random
import struct
from typing import Any

import orjson
import pytest

from replicator.errors import CorruptSegmentError
from replicator.restore.foldblock import (
    CONTINUE,
    END,
    STOPPED,
    FoldBlock,
    decode_head,
    fold_block_py,
    native_fold_block,
)
from replicator.segment.format import encode_record


def test_native_fold_is_built_in_ci() -> None:
    """CI must exercise the native fold, not silently fall back to the reference."""
    if os.environ.get("CI") == "true" and not os.environ.get("REPLICATOR_NO_NATIVE"):
        assert native_fold_block is not None, "replicator.restore._fold was not built"


needs_native = pytest.mark.skipif(native_fold_block is None and os.environ.get("CI") != "true",
                                  reason="native fold not built (no C compiler)")

_KEYS = ["a", "k-1", "k-2", "ключ", "k\"q", "k\\b", "日本", "x" * 40, "k\u2028", "k\n",
         # around the decided-key set's inline limit (16 bytes of UTF-8)
         "p" * 16, "p" * 17, "p" * 15 + "é", "s" * 16 + "t"]


def _value(rng: random.Random, key: str) -> bytes:
    """A change event, sometimes written in ways a fast scanner must not misread."""
    kind = rng.random()
    ev: dict[str, Any] = {"entity": "t", "op": rng.choice(["upsert", "upsert", "delete"]),
                          "key": key, "ts": "2026-01-01T00:00:00Z",
                          "data": {"n": rng.randint(0, 9), "s": rng.choice(["x", "}\"{", "\\"]),
                                   "key": "not-the-key", "nested": {"op": "delete",
                                                                   "version": 99}}}
    r = rng.random()
    if r < 0.5:
        ev["version"] = rng.randint(-5, 10**12)
    elif r < 0.6:
        ev["version"] = None
    elif r < 0.65:
        ev["version"] = 10**20  # beyond 64 bits: handed to the reference decoder
    if kind < 0.1:  # data first, envelope fields last
        ev = {"data": ev.pop("data"), **ev}
    raw = json.dumps(ev, separators=(",", ":"), ensure_ascii=rng.random() < 0.3).encode()
    if kind > 0.95:
        raw = b" \n" + raw.replace(b",", b" , ").replace(b":", b" : ") + b"\t"
    elif kind > 0.9:  # an escaped name for "key": only the reference decoder reads it
        raw = raw.replace(b'"key":', b'"\\u006bey":', 1)
    return raw


def _block(rng: random.Random, start: int, n: int) -> tuple[bytes, int]:
    parts = []
    off = start
    hdr = [("entity", b"t")]
    for _ in range(n):
        off += rng.choice([1, 1, 1, 2])
        if rng.random() < 0.1:
            hdr = rng.choice([[], [("entity", b"t")], [("entity", b"u"), ("x", None)]])
        key = rng.choice(_KEYS)
        value = None if rng.random() < 0.03 else _value(rng, key)
        kafka_key = None if rng.random() < 0.1 else key.encode()
        parts.append(encode_record(off, 1000 + off * 7 % 500, 0, kafka_key, value, hdr))
    return b"".join(parts), off


def _run(fn: FoldBlock, blocks: list[bytes], **kw: Any) -> tuple[dict[str, Any], list[Any]]:
    out: dict[str, Any] = {}
    lh, lc = b"", -1
    results = []

    def odd(value: bytes, off: int) -> tuple[str, bool, int | None]:
        h = decode_head(value)
        return h.key, h.op == "delete", h.version

    for raw in blocks:
        n, status, stopped, lh, lc = fn(raw, kw.get("lo", 0), kw.get("hi", 1 << 62),
                                        kw.get("cut_ms"), kw.get("stop_ms"), 3, out,
                                        kw.get("keys"), kw.get("keep_record", False), lh, lc,
                                        odd)
        results.append((n, status, stopped, lh, lc))
        if status == STOPPED:
            break
    return out, results


@needs_native
@pytest.mark.parametrize("seed", range(12))
def test_native_equals_reference(seed: int) -> None:
    assert native_fold_block is not None
    rng = random.Random(seed)
    blocks = []
    off = 0
    for _ in range(4):
        raw, off = _block(rng, off, rng.randint(1, 300))
        blocks.append(raw)
    variants: list[dict[str, Any]] = [
        {}, {"keep_record": True}, {"lo": off // 3, "hi": off * 2 // 3},
        {"cut_ms": 1250}, {"stop_ms": 1400}, {"keys": {"a", "ключ", "k\"q"}},
        {"keys": ["k-2"], "keep_record": True, "cut_ms": 1300},
    ]
    for kw in variants:
        ref_out, ref_res = _run(fold_block_py, blocks, **kw)
        nat_out, nat_res = _run(native_fold_block, blocks, **kw)
        assert nat_out == ref_out, kw
        assert nat_res == ref_res, kw
        assert {r[1] for r in nat_res} <= {CONTINUE, END, STOPPED}
    ref_out, _ = _run(fold_block_py, blocks)
    assert len(ref_out) >= 3  # the comparison above was not of empty states


@needs_native
def test_headers_shared_between_winners_of_a_run() -> None:
    assert native_fold_block is not None
    recs = [encode_record(i, 10, 0, b"k", orjson.dumps(
        {"key": f"k{i}", "op": "upsert", "data": {}}), [("entity", b"t")]) for i in range(5)]
    out, _ = _run(native_fold_block, [b"".join(recs)], keep_record=True)
    hdrs = {id(v[6]) for v in out.values()}
    assert len(hdrs) == 1 and out["k0"][5] == b"k"


@needs_native
@pytest.mark.parametrize("bad", [b"not json", b'{"key": 5, "op": "upsert"}',
                                 b'{"op": "upsert"}', b'{"key": "a", "op": "upsert", '
                                 b'"version": 1.5}', b'{"key": "a", "op": "upsert"'])
def test_bad_values_reach_the_reference_decoder(bad: bytes) -> None:
    assert native_fold_block is not None
    raw = encode_record(7, 10, 0, None, bad, [])

    def odd(value: bytes, off: int) -> tuple[str, bool, int | None]:
        raise CorruptSegmentError("seg", 0, f"offset {off}: {value!r}", off)

    for fn in (fold_block_py, native_fold_block):
        with pytest.raises(CorruptSegmentError, match="offset 7"):
            fn(raw, 0, 100, None, None, 0, {}, None, False, b"", -1, odd)


@needs_native
def test_truncated_framing_is_an_error_in_both() -> None:
    assert native_fold_block is not None
    good = encode_record(1, 10, 0, b"k", b'{"key":"a","op":"upsert"}', [("h", b"v")])
    for cut in (5, 30, len(good) - 1):
        for fn in (fold_block_py, native_fold_block):
            with pytest.raises((ValueError, struct.error)):
                fn(good[:cut], 0, 100, None, None, 0, {}, None, False, b"", -1,
                   lambda v, o: ("a", False, None))


def _run_latest(fn: Any, blocks: list[bytes], seen: Any = None, **kw: Any
                ) -> tuple[dict[str, Any], int]:
    out: dict[str, Any] = {}
    n = 0

    def odd(value: bytes, off: int) -> tuple[str, bool, int | None]:
        h = decode_head(value)
        return h.key, h.op == "delete", h.version

    for raw in reversed(blocks):
        n += fn(raw, kw.get("lo", 0), kw.get("hi", 1 << 62), kw.get("cut_ms"), 3, out,
                kw.get("keys"), kw.get("keep_record", False), odd, seen)
    return out, n


@pytest.mark.parametrize("seed", range(10))
def test_newest_first_reaches_the_same_state(seed: int) -> None:
    """fold_block_latest over the blocks newest first == fold_block over them in order, for
    the reference and (when built) the native form."""
    from replicator.restore.foldblock import (
        fold_block_latest_py,
        native_fold_block_latest,
        new_keyset,
    )

    rng = random.Random(100 + seed)
    blocks = []
    off = 0
    for _ in range(4):
        raw, off = _block(rng, off, rng.randint(1, 300))
        blocks.append(raw)
    variants: list[dict[str, Any]] = [
        {}, {"keep_record": True}, {"lo": off // 3, "hi": off * 2 // 3}, {"cut_ms": 1250},
        {"keys": {"a", "ключ", "k\"q"}}, {"keys": ["k-2"], "keep_record": True, "cut_ms": 1300},
    ]
    fns = [fold_block_latest_py] + ([native_fold_block_latest] if native_fold_block_latest
                                    else [])
    for kw in variants:
        want, results = _run(fold_block_py, blocks, **kw)
        for fn in fns:
            got, n = _run_latest(fn, blocks, **kw)
            assert got == want, (fn, kw)
            assert n == sum(r[0] for r in results), (fn, kw)
        if native_fold_block_latest is not None:  # with the set of decided keys
            got, n = _run_latest(native_fold_block_latest, blocks, new_keyset(), **kw)
            assert got == want, kw
            assert n == sum(r[0] for r in results), kw


def _keyed_blocks(rng: random.Random, keys: list[str], count: int, per_block: int
                  ) -> list[bytes]:
    """``count`` blocks of ``per_block`` records, each a change of a key drawn from
    ``keys``, offsets consecutive from 1."""
    blocks, off = [], 0
    for _ in range(count):
        parts = []
        for _ in range(per_block):
            off += 1
            key = rng.choice(keys)
            parts.append(encode_record(off, 1000 + off % 500, 0, key.encode(),
                                       _value(rng, key), [("entity", b"t")]))
        blocks.append(b"".join(parts))
    return blocks


@needs_native
def test_decided_key_set_across_growth_and_key_lengths() -> None:
    """Enough distinct keys to grow the native set several times, of lengths on both sides
    of its inline limit and sharing long prefixes: the newest-first fold with the set still
    equals the forward reference."""
    from replicator.restore.foldblock import native_fold_block_latest, new_keyset

    rng = random.Random(7)
    keys = [f"{'k' * rng.choice([1, 8, 14, 15, 16, 17, 30])}-{i}" for i in range(40_000)]
    blocks = _keyed_blocks(rng, keys, 6, 20_000)
    want, _ = _run(fold_block_py, blocks)
    got, n = _run_latest(native_fold_block_latest, blocks, new_keyset())
    assert len(want) > 30_000
    assert got == want
    assert n == 6 * 20_000


@needs_native
def test_decided_key_set_tells_colliding_keys_apart() -> None:
    """With the set's hashes narrowed to 6 bits nearly every key collides: only the byte
    comparison (inline up to 16 bytes, in the arena beyond) separates them."""
    from replicator.restore import _fold  # type: ignore[attr-defined]
    from replicator.restore.foldblock import native_fold_block_latest, new_keyset

    rng = random.Random(8)
    # same lengths, differing only in their last bytes, around the inline limit
    keys = [f"{'k' * w}{i:04d}" for w in (4, 11, 12, 13, 30) for i in range(400)]
    blocks = _keyed_blocks(rng, keys, 3, 4000)
    want, _ = _run(fold_block_py, blocks)
    _fold.set_keyset_hash_bits(6)
    try:
        got, _ = _run_latest(native_fold_block_latest, blocks, new_keyset())
    finally:
        _fold.set_keyset_hash_bits(64)
    assert len(want) > 1500
    assert got == want


@needs_native
def test_native_merge_changes_equals_the_reference() -> None:
    """replay's cross-partition merge: the native loop keeps what the Python loop keeps,
    ties and huge versions (beyond 64 bits: compared by the reference `beats`) included."""
    from replicator.restore.foldblock import _merge_changes_py, merge_changes
    from replicator.restore.replay import _beats

    assert merge_changes is not _merge_changes_py
    rng = random.Random(8)
    for _ in range(20):
        keys = [f"k{i}" for i in range(300)]
        def change(rank: int) -> tuple[Any, ...]:
            version = rng.choice([-1, 0, 1, 2, 2**70, -(2**70)])
            return (version, rng.choice([5, 6]), rank, rng.randint(0, 9),
                    rng.choice([b"v", None]), None, b"")
        merged = {k: change(0) for k in rng.sample(keys, 200)}
        local = {k: change(1) for k in rng.sample(keys, 200)}
        a, b = dict(merged), dict(merged)
        _merge_changes_py(a, local, _beats)
        merge_changes(b, local, _beats)
        assert a == b
        assert all(a[k] is b[k] for k in a)
