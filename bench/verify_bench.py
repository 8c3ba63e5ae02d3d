"""``replicator verify``: full vs incremental verification time on a store of realistic size.

History: ``events`` attendance changes (realistic ~600-byte row images, ``keys`` records)
over 3 partitions, written as real sealed segments of ``per_segment`` events (a segment per
seal interval, as ingest makes them at a steady rate), ~256 KiB blocks, a watermark object
per partition; then a full snapshot at 80 % of the history and an incremental at its end.

Measured in one process, in order (``state`` = ``<workdir>/verify-state.json``):

* ``full``: ``verify_store(full=True)`` with no state -- every segment and snapshot file
  read and checked (the cost of a verification that does not remember);
* ``incremental``: the next run, nothing new -- the rotating sample only
  (``max(sample_min, ceil(sample_fraction * files))`` files);
* ``incremental_new``: as if the newest segment of each partition had just been stored (their
  entries removed from the state) -- the new files plus the sample;
* ``deep_first`` / ``deep_again``: ``--deep`` when no snapshot was rebuilt yet (the full
  from every segment before its cut, the incremental from its range) and right after (none
  due: snapshots are immutable);
* ``drill``: ``replicator drill`` of the same store at ``latest`` and at a random point (a
  verified restore into a temporary SQLite database): its RTO and what it read.

Run: ``python -m bench.verify_bench --workdir /tmp/vb [--events 1000000 --per-segment 2500]``
(prints one JSON document; ``--out FILE`` also writes it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from replicator import naming
from replicator.catalog import Catalog
from replicator.compaction.runner import compact
from replicator.ops.verify import STATE_FILE, StoreState, load_state, save_state, verify_store
from replicator.schemas import SchemaRegistry
from replicator.segment.writer import ActiveSegment, BlockBuilder
from replicator.snapshot.tiers import Tiers
from replicator.storage.local import LocalStore

PARTITIONS = 3
BASE_MS = 1_764_000_000_000
STATUS = ("present", "late", "absent", "excused")
METHOD = ("ble", "qr", "manual")


def log(msg: str) -> None:
    print(f"[verify-bench] {msg}", file=sys.stderr, flush=True)


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def write_history(root: Path, *, events: int, keys: int, per_segment: int, seed: int = 1
                  ) -> tuple[LocalStore, list[int]]:
    """The store under ``root/store``; returns it and every event's timestamp."""
    rng = random.Random(seed)
    store = LocalStore(root=root / "store")
    tmp = root / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    hdr = [("entity", b"attendance"), ("schema_version", b"1")]
    versions = [0] * keys
    parts = [{"off": 0, "start": 0, "n": 0, "seg": None, "b": BlockBuilder(0)}
             for _ in range(PARTITIONS)]
    stamps: list[int] = []
    ms = BASE_MS

    def seal(p: int, st: dict[str, Any], watermark: int) -> None:
        b: BlockBuilder = st["b"]
        blk = b.take(watermark)
        if blk is not None:
            st["seg"].write(blk)
        st["seg"].sync()
        st["seg"].seal()
        store.put_file_sync(naming.segment_name("attendance", p, st["start"], st["off"]),
                            st["path"])
        st["path"].unlink()
        st["seg"], st["start"], st["n"], st["b"] = None, st["off"], 0, BlockBuilder(st["off"])

    for i in range(events):
        k = i if i < keys else rng.randrange(keys)
        versions[k] += 1
        ms += rng.choice((0, 1, 2, 3))
        stamps.append(ms)
        key = f"att-{k:09d}"
        v = versions[k]
        data = {
            "record_id": key, "participant_id": f"prt_{(k * 7919) % 999983:012x}",
            "event_id": f"evt-2026-{k % 40:03d}", "session_id": f"ses-{k % 400:04d}-track",
            "status": STATUS[(k + v) % 4], "check_in_at": _iso(ms - 60_000),
            "check_out_at": _iso(ms) if v % 3 == 0 else None, "method": METHOD[k % 3],
            "device_id": f"kiosk-{k % 97:03d}", "signal_strength_dbm": -40 - (k + v) % 50,
            "location": {"lat": 59.9 + (k % 1000) / 1e4, "lon": 10.7 + (v % 1000) / 1e4},
            "notes": None if v % 5 else "corrected by staff",
            "recorded_by": f"svc:checkin-gateway/kiosk-{k % 97:03d}",
        }
        value = orjson.dumps({"entity": "attendance", "op": "upsert", "key": key,
                              "ts": _iso(ms), "version": v, "schema_version": 1, "data": data})
        p = k % PARTITIONS
        st = parts[p]
        if st["seg"] is None:
            st["path"] = tmp / f"attendance-{p}-{st['start']}.seg"
            st["seg"] = ActiveSegment.create(st["path"], topic="attendance", partition=p,
                                             base_offset=st["start"])
        b = st["b"]
        b.append(st["off"], ms, 0, key.encode(), value, hdr)
        st["off"] += 1
        st["n"] += 1
        if b.pending_bytes >= 256 << 10:
            blk = b.take(0)
            assert blk is not None
            st["seg"].write(blk)
        if st["n"] >= per_segment:
            seal(p, st, ms)
        if i and i % 200_000 == 0:
            log(f"history {i:,}/{events:,}")
    newest = ms + 1000
    for p, st in enumerate(parts):
        if st["seg"] is not None:
            seal(p, st, newest)
        store.put_bytes_sync(naming.watermark_name("attendance", p), orjson.dumps({
            "topic": "attendance", "partition": p, "stored_end": st["off"],
            "durable_end": st["off"], "watermark_ms": newest, "updated_ms": newest,
        }), create_only=False)
    shutil.rmtree(tmp, ignore_errors=True)
    return store, stamps


def _sizes(root: Path) -> dict[str, Any]:
    segs = list((root / naming.SEGMENTS_ROOT).rglob("*.seg"))
    snaps = [p for p in (root / naming.SNAPSHOTS_ROOT).rglob("*") if p.is_file()]
    return {"segments": len(segs), "segment_bytes": sum(p.stat().st_size for p in segs),
            "snapshot_files": sum(1 for p in snaps if p.suffix == ".snap"),
            "snapshot_bytes": sum(p.stat().st_size for p in snaps)}


def _run(store: LocalStore, state: Path, reg: SchemaRegistry, **kw: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    rep = asyncio.run(verify_store(store, state_path=state, registry=reg, **kw))
    wall = time.perf_counter() - t0
    assert rep.status == "ok", [p.to_json() for p in rep.problems]
    return {"seconds": round(wall, 3), "files_checked": rep.files_checked,
            "files_skipped": rep.files_skipped, "bytes_read": rep.bytes_read,
            "deep": rep.checks.get("deep")}


def _drills(store_root: Path, data_dir: Path) -> dict[str, Any]:
    """``replicator drill`` on the same store: the RTO it measures at ``latest`` (from the
    full + incremental snapshot chain) and at a random point (snapshot plus segments)."""
    from dataclasses import replace

    from replicator.config import Config, KafkaSettings, StoreSettings
    from replicator.ops.drill import run_drill

    cfg = replace(Config(), kafka=replace(KafkaSettings(), topics=("attendance",)),
                  store=StoreSettings(url=str(store_root)),
                  ingest=replace(Config().ingest, data_dir=data_dir))
    out: dict[str, Any] = {}
    for mode in ("latest", "random"):
        r = asyncio.run(run_drill(cfg, at=mode, seed=1))
        assert r["ok"], r
        out[mode] = {k: r[k] for k in ("rto_s", "rto_extrapolated_s", "bytes_read",
                                       "full_bytes", "events", "rows", "replay_seconds",
                                       "load_seconds", "snapshots")}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--per-segment", type=int, default=2500)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    shutil.rmtree(a.workdir, ignore_errors=True)
    a.workdir.mkdir(parents=True)
    t0 = time.perf_counter()
    store, stamps = write_history(a.workdir, events=a.events, keys=a.keys,
                                  per_segment=a.per_segment)
    log(f"history written in {time.perf_counter() - t0:.0f}s")
    reg = SchemaRegistry.load()
    cat = Catalog(store=store, data_dir=None)
    tiers = Tiers.for_store(store)
    t0 = time.perf_counter()
    for kind, at in (("full", stamps[len(stamps) * 4 // 5]), ("incremental", None)):
        asyncio.run(compact(cat, tiers, reg, ["attendance"], kind, work_dir=a.workdir / "work",
                            at_ms=at))
    log(f"snapshots built in {time.perf_counter() - t0:.0f}s")
    state = a.workdir / STATE_FILE
    sizes = _sizes(store.root)
    res: dict[str, Any] = {"events": a.events, "keys": a.keys, "per_segment": a.per_segment,
                           "store": sizes, "sample": {"fraction": 0.05, "min": 8}}
    log("verify --full")
    res["full"] = _run(store, state, reg, full=True)
    log("verify (incremental, nothing new)")
    res["incremental"] = _run(store, state, reg)
    stores, _ = load_state(state)
    st = stores[store.url]
    newest = [sorted(n for n in st.files if n.startswith(naming.segments_prefix("attendance", p))
                     )[-1] for p in range(PARTITIONS)]
    save_state(state, {store.url: StoreState(st.run, {n: s for n, s in st.files.items()
                                                      if n not in newest}, st.deep)})
    log("verify (incremental, 3 new segments)")
    res["incremental_new"] = _run(store, state, reg)
    log("verify --deep (first)")
    res["deep_first"] = _run(store, state, reg, deep=True)
    log("verify --deep (again)")
    res["deep_again"] = _run(store, state, reg, deep=True)
    res["full_over_incremental"] = round(res["full"]["seconds"]
                                         / max(res["incremental"]["seconds"], 1e-6), 1)
    log("drill (latest, then a random point) into a temporary SQLite database")
    res["drill"] = _drills(store.root, a.workdir / "drill-data")
    doc = json.dumps(res, indent=2)
    print(doc)
    if a.out:
        a.out.write_text(doc + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
