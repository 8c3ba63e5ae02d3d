"""The cost of encryption at rest on segment write and read (1 MiB blocks of demo events).

For the same records, plain (format 1) and encrypted (format 2, AES-256-GCM):

* ``encode``: ``segment.format.encode_block`` alone (lz4 + [seal] + CRC), the CPU part of a
  block write;
* ``write``: ``ActiveSegment.write`` of every block into a file (encode + ``write``), then
  one fsync and the seal -- what the spool's flusher pays per block, fsync amortised;
* ``read``: ``SegmentReader.iter_block_payloads`` over the sealed file (CRC + [open] + lz4
  decompression), the path of restore, compaction and followers;
* ``read+walk``: the same plus walking every record with ``format.iter_values`` (what the
  follower and the restore's fold do next);
* ``aes_gcm``: AES-256-GCM alone on 1 MiB (seal and open), the floor of the overhead.

Figures are MB/s of *uncompressed* record bytes, best of ``--repeat`` runs (the machine is
shared). Run: ``python -m bench.encryption_bench [--mib 64] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from replicator import crypto
from replicator.crypto import Keyring
from replicator.demo import iter_events
from replicator.segment import format as fmt
from replicator.segment.reader import SegmentReader
from replicator.segment.writer import ActiveSegment, BlockBuilder, PendingBlock

BLOCK = 1024 * 1024


def make_blocks(mib: int) -> list[PendingBlock]:
    """``mib`` blocks of ~1 MiB of framed demo change events (realistic lz4 ratio)."""
    b = BlockBuilder(0)
    out: list[PendingBlock] = []
    off = 0
    events = iter_events(10_000_000, seed=3)
    hdrs = (("entity", b"attendance"), ("schema_version", b"1"))
    while len(out) < mib:
        ce = next(events)
        b.append(off, 1_764_000_000_000 + off, 0, ce.key.encode(),
                 orjson.dumps(ce.envelope(schema_version=1)), hdrs)
        off += 1
        if b.pending_bytes >= BLOCK:
            blk = b.take()
            assert blk is not None
            out.append(blk)
    return out


def best(repeat: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(mib: int, repeat: int, workdir: Path) -> dict[str, object]:
    blocks = make_blocks(mib)
    raw_mb = sum(len(b.raw) for b in blocks) / 1e6
    keyring = Keyring.from_keys([os.urandom(32)])
    ctx = fmt.block_context("attendance", 0)
    out: dict[str, object] = {"blocks": len(blocks), "raw_mb": round(raw_mb, 1)}
    fns: dict[tuple[str, str], Callable[[], object]] = {}
    for label, kr in (("plain", None), ("encrypted", keyring)):
        def encode(kr: Keyring | None = kr) -> None:
            for b in blocks:
                fmt.encode_block(b.raw, records=b.records, start=b.start, end=b.end,
                                 min_ts=b.min_ts, max_ts=b.max_ts, keyring=kr, context=ctx)

        path = workdir / f"{label}.seg"

        def write(kr: Keyring | None = kr, path: Path = path) -> None:
            path.unlink(missing_ok=True)
            seg = ActiveSegment.create(path, topic="attendance", partition=0, base_offset=0,
                                       keyring=kr)
            for b in blocks:
                seg.write(b)
            seg.sync()
            seg.seal()

        def read(kr: Keyring | None = kr, path: Path = path) -> None:
            with SegmentReader(path, expect_sealed=True, keyring=kr) as r:
                for _meta, _raw in r.iter_block_payloads():
                    pass

        def read_walk(kr: Keyring | None = kr, path: Path = path) -> None:
            with SegmentReader(path, expect_sealed=True, keyring=kr) as r:
                for _meta, raw in r.iter_block_payloads():
                    for _v in fmt.iter_values(raw):
                        pass

        for name, fn in (("encode", encode), ("write", write), ("read", read),
                         ("read+walk", read_walk)):
            fns[(label, name)] = fn
    # interleaved (plain, encrypted, plain, ...) so that load from other processes on a
    # shared machine hits both alike; the best run of each counts
    times: dict[tuple[str, str], float] = {}
    for _ in range(repeat):
        for name in ("write", "encode", "read", "read+walk"):
            for label in ("plain", "encrypted"):
                t = best(1, fns[(label, name)])
                times[(label, name)] = min(times.get((label, name), t), t)
    for label in ("plain", "encrypted"):
        res: dict[str, float] = {name: round(raw_mb / times[(label, name)], 1)
                                 for name in ("encode", "write", "read", "read+walk")}
        res["file_mb"] = round((workdir / f"{label}.seg").stat().st_size / 1e6, 2)
        out[label] = res
    one = blocks[0].raw[:BLOCK]
    sealed = keyring.seal(one, b"aad")

    out["aes_gcm_seal"] = round(len(one) / 1e6 / best(repeat * 20, lambda: keyring.seal(
        one, b"aad")), 1)
    out["aes_gcm_open"] = round(len(one) / 1e6 / best(repeat * 20, lambda: crypto.open_blob(
        keyring, sealed, b"aad", name="x", position=0)), 1)
    p, e = out["plain"], out["encrypted"]
    assert isinstance(p, dict) and isinstance(e, dict)
    out["slowdown"] = {k: round(p[k] / e[k], 3) for k in ("encode", "write", "read",
                                                         "read+walk")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="enc-bench-") as d:
        print(json.dumps(measure(args.mib, args.repeat, Path(d)), indent=2))


if __name__ == "__main__":
    main()
