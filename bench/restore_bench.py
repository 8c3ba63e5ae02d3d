"""Section ``restore``: point-in-time restore into PostgreSQL and SQLite vs bare loads.

History: ``keys`` attendance records over 3 partitions, ``events`` changes in total (every
key created once, then random updates -- realistic attendance row images, ~500 bytes,
made by a fast template rather than the demo generator so that 5M events take seconds),
written as real segment files into a local store exactly as ingest lays them out (64 MiB
segments, ~1 MiB blocks, a watermark object per partition).

Measured in one process, same machine, same run, in rounds (each: both restores, then both
baselines); each figure is the best of its rounds, the ratios are between bests (medians of
the per-round ratios alongside):

* ``pg_rows_per_s``: the full ``restore --at latest`` (plan, replay, binary COPY in key
  order into a fresh schema, read-back digest, commit) / live rows;
* ``copy_rows_per_s``: asyncpg ``copy_records_to_table`` of the identical final rows
  (already in memory, already typed) into an identical fresh table, in key order (and, for
  information, ``copy_key_after_seconds``: the same into the table without its primary key,
  the key built after, as the restore does);
* ``sqlite_rows_per_s`` vs ``executemany`` of the identical rows into an identical table
  in one transaction;
* ``restore_seconds_by_history``: SQLite restore time for 1x, 3x and 10x history with the
  same key count (the curve snapshots must flatten).

Run alone: ``python -m bench.restore_bench --pg-dsn ... [--keys 1000000 --events 5000000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import resource
import shutil
import sqlite3
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from replicator import naming
from replicator.catalog import Catalog
from replicator.restore.layout import TableLayout
from replicator.restore.point import Latest
from replicator.restore.rowcodec import event_rows
from replicator.restore.runner import execute_restore, make_plan
from replicator.schemas import SchemaRegistry
from replicator.segment.writer import ActiveSegment, BlockBuilder
from replicator.storage.local import LocalStore
from replicator.targets.postgres import add_key_sql as pg_add_key
from replicator.targets.postgres import create_table_sql as pg_create
from replicator.targets.postgres import pg_rows
from replicator.targets.sqlite import create_table_sql as sqlite_create
from replicator.targets.sqlite import sqlite_rows

PARTITIONS = 3
BASE_MS = 1_764_000_000_000
_STATUS = ("present", "late", "absent", "excused")
_METHOD = ("ble", "qr", "manual")


def _iso(ms: int) -> str:
    t = time.gmtime(ms // 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{ms % 1000:03d}Z"


def write_history(root: Path, *, keys: int, events: int, seed: int,
                  log: Any = print) -> tuple[LocalStore, int]:
    """Write the history; returns the store and the newest watermark (ms)."""
    rng = random.Random(seed)
    store = LocalStore(root=root / "store")
    tmp = root / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    parts: list[dict[str, Any]] = []
    for p in range(PARTITIONS):
        path = tmp / f"attendance-{p}.seg"
        parts.append({"seg": ActiveSegment.create(path, topic="attendance", partition=p,
                                                  base_offset=0),
                      "b": BlockBuilder(0), "off": 0, "start": 0, "path": path, "p": p})
    versions = [0] * keys
    hdr = [("entity", b"attendance"), ("schema_version", b"1")]
    ms = BASE_MS
    t0 = time.monotonic()
    for i in range(events):
        k = i if i < keys else rng.randrange(keys)
        versions[k] += 1
        ms += rng.choice((0, 1, 2))
        key = f"att-{k:09d}"
        v = versions[k]
        ts = _iso(ms)
        data = {
            "record_id": key, "participant_id": f"prt_{(k * 7919) % 999983:012x}",
            "event_id": f"evt-2026-{k % 40:03d}", "session_id": f"ses-{k % 400:04d}-track",
            "status": _STATUS[(k + v) % 4], "check_in_at": _iso(ms - 60_000),
            "check_out_at": ts if v % 3 == 0 else None, "method": _METHOD[k % 3],
            "device_id": f"kiosk-{k % 97:03d}", "signal_strength_dbm": -40 - (k + v) % 50,
            "location": {"lat": 59.9 + (k % 1000) / 1e4, "lon": 10.7 + (v % 1000) / 1e4},
            "notes": None if v % 5 else "corrected by staff",
            "recorded_by": f"svc:checkin-gateway/kiosk-{k % 97:03d}",
        }
        value = orjson.dumps({"entity": "attendance", "op": "upsert", "key": key, "ts": ts,
                              "version": v, "schema_version": 1, "data": data})
        st = parts[k % PARTITIONS]
        b: BlockBuilder = st["b"]
        b.append(st["off"], ms, 0, key.encode(), value, hdr)
        st["off"] += 1
        if b.pending_bytes >= 1 << 20:
            blk = b.take(0)
            assert blk is not None
            st["seg"].write(blk)
            if st["seg"].size >= 64 << 20:
                _seal(store, st, ms, tmp)
        if i and i % 1_000_000 == 0:
            log(f"restore: history {i:,}/{events:,} events ({time.monotonic() - t0:.0f}s)")
    newest = ms + 1000
    for p, st in enumerate(parts):
        blk = st["b"].take(newest)
        if blk is not None:
            st["seg"].write(blk)
        _seal(store, st, newest, tmp, last=True)
        store.put_bytes_sync(naming.watermark_name("attendance", p), orjson.dumps({
            "topic": "attendance", "partition": p, "stored_end": st["off"],
            "durable_end": st["off"], "watermark_ms": newest, "updated_ms": newest,
        }), create_only=False)
    shutil.rmtree(tmp, ignore_errors=True)
    return store, newest


def _seal(store: LocalStore, st: dict[str, Any], ms: int, tmp: Path, last: bool = False) -> None:
    """Seal the partition's segment into the store; open the next one unless ``last``."""
    seg: ActiveSegment = st["seg"]
    seg.sync()
    seg.seal()
    end, p = st["off"], st["p"]
    store.put_file_sync(naming.segment_name("attendance", p, st["start"], end), st["path"])
    st["path"].unlink()
    if not last:
        st["start"] = end
        st["path"] = tmp / f"attendance-{p}-{end}.seg"
        st["seg"] = ActiveSegment.create(st["path"], topic="attendance", partition=p,
                                         base_offset=end)
        st["b"] = BlockBuilder(end)


async def _restore(store: LocalStore, url: str) -> tuple[float, int, dict[str, Any]]:
    reg = SchemaRegistry.load()
    cat = Catalog(store=store, data_dir=None)
    t0 = time.perf_counter()
    plan = await make_plan(cat, reg, ["attendance"], Latest())
    rep = await execute_restore(cat, reg, plan, url)
    dt = time.perf_counter() - t0
    rows = sum(r.rows for r in rep.results)
    return dt, rows, rep.to_json()


async def _final_rows(store: LocalStore) -> tuple[TableLayout, list[Any]]:
    """The identical final rows (parsed), for the bare-load baselines."""
    from replicator.restore.digest import DigestBuilder
    from replicator.restore.replay import replay
    from replicator.restore.runner import local_paths

    reg = SchemaRegistry.load()
    cat = Catalog(store=store, data_dir=None)
    plan = await make_plan(cat, reg, ["attendance"], Latest())
    paths = await local_paths(cat, plan)
    state = replay(plan, lambda s: paths[s.name])
    layout = TableLayout.from_schema("attendance", reg.json_schema("attendance"))
    rows = list(event_rows(layout, plan, state["attendance"], DigestBuilder("attendance")))
    return layout, rows


async def _bare_copy(dsn: str, layout: TableLayout, typed: list[tuple[Any, ...]], *,
                     key_after: bool = False) -> float:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DROP SCHEMA IF EXISTS bench_copy CASCADE")
        t0 = time.perf_counter()
        async with conn.transaction():
            await conn.execute("CREATE SCHEMA bench_copy")
            await conn.execute(pg_create("bench_copy", layout, key_constraint=not key_after))
            await conn.copy_records_to_table("attendance", schema_name="bench_copy",
                                             columns=layout.column_names, records=typed)
            if key_after:
                await conn.execute(pg_add_key("bench_copy", layout))
        dt = time.perf_counter() - t0
        await conn.execute("DROP SCHEMA bench_copy CASCADE")
        return dt
    finally:
        await conn.close()


async def _drop_schemas(dsn: str, prefix: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        for r in await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE $1",
                                  prefix + "%"):
            await conn.execute(f'DROP SCHEMA "{r[0]}" CASCADE')
    finally:
        await conn.close()


def _bare_sqlite(path: Path, layout: TableLayout, typed: list[tuple[Any, ...]]) -> float:
    path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("BEGIN")
    conn.execute(sqlite_create(layout))
    marks = ", ".join("?" * len(layout.columns))
    conn.executemany(f'INSERT INTO "attendance" VALUES ({marks})', typed)
    conn.execute("COMMIT")
    conn.close()
    dt = time.perf_counter() - t0
    path.unlink()
    return dt


async def restore_section(workdir: Path, *, pg_dsn: str, keys: int, events: int, seed: int,
                          log: Any = print, curve: bool = True, rounds: int = 2
                          ) -> dict[str, Any]:
    out: dict[str, Any] = {"keys": keys, "events": events, "partitions": PARTITIONS}
    hist = workdir / "restore-history"
    shutil.rmtree(hist, ignore_errors=True)
    t0 = time.monotonic()
    store, _ = write_history(hist, keys=keys, events=events, seed=seed, log=log)
    out["history_write_seconds"] = round(time.monotonic() - t0, 1)
    seg_bytes = sum(p.stat().st_size for p in (hist / "store").rglob("*.seg"))
    out["segment_bytes"] = seg_bytes

    # Rounds, each: the two restores, then the two baselines of the same rows. Every
    # figure is the best of its rounds (noise on a shared VM only slows a run down); the
    # ratios are taken between bests, and per round alongside.
    db = workdir / "bench-restore.db"
    rounds_out: list[dict[str, Any]] = []
    for rnd in range(1, rounds + 1):
        r: dict[str, Any] = {}
        log(f"restore: round {rnd}/{rounds}: PostgreSQL restore at latest")
        await _drop_schemas(pg_dsn, "bench_")
        dt, rows, rep = await _restore(store, f"{pg_dsn}?schema=bench_restore")
        await _drop_schemas(pg_dsn, "bench_")
        r.update(pg_rows=rows, pg_seconds=round(dt, 2), pg_replay_seconds=rep["replay_seconds"],
                 pg_load_seconds=rep["load_seconds"], pg_verify_seconds=rep["verify_seconds"])
        gc.collect()

        log(f"restore: round {rnd}/{rounds}: SQLite restore at latest")
        db.unlink(missing_ok=True)
        dt_s, _rows_s, rep_s = await _restore(store, f"sqlite://{db}")
        db.unlink(missing_ok=True)
        r.update(sqlite_seconds=round(dt_s, 2), sqlite_replay_seconds=rep_s["replay_seconds"],
                 sqlite_load_seconds=rep_s["load_seconds"],
                 sqlite_verify_seconds=rep_s["verify_seconds"])
        gc.collect()
        if rnd == 1:  # peak memory so far: history writing (small) and the two restores
            out["peak_rss_mib_restores"] = round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

        log(f"restore: round {rnd}/{rounds}: baselines (bare COPY / executemany of the "
            "identical rows)")
        layout, parsed = await _final_rows(store)
        typed_pg = list(pg_rows(layout, parsed))
        r["copy_seconds"] = round(await _bare_copy(pg_dsn, layout, typed_pg), 2)
        # for information: the same COPY into the table without its key, the key built
        # after (what the restore does): how much of pg_ratio that strategy is
        r["copy_key_after_seconds"] = round(
            await _bare_copy(pg_dsn, layout, typed_pg, key_after=True), 2)
        del typed_pg
        typed_sq = list(sqlite_rows(layout, parsed))
        del parsed
        r["sqlite_bare_seconds"] = round(
            _bare_sqlite(workdir / "bench-bare.db", layout, typed_sq), 2)
        del typed_sq
        gc.collect()
        r["pg_ratio"] = round(r["copy_seconds"] / r["pg_seconds"], 3)
        r["sqlite_ratio"] = round(r["sqlite_bare_seconds"] / r["sqlite_seconds"], 3)
        log(f"restore: round {rnd}/{rounds}: pg {r['pg_seconds']}s vs COPY "
            f"{r['copy_seconds']}s ({r['pg_ratio']}); sqlite {r['sqlite_seconds']}s vs "
            f"executemany {r['sqlite_bare_seconds']}s ({r['sqlite_ratio']})")
        rounds_out.append(r)

    def best(name: str) -> Any:
        return min(rounds_out, key=lambda x: float(x[name]))[name]

    rows = rounds_out[0]["pg_rows"]
    fast_pg = min(rounds_out, key=lambda x: float(x["pg_seconds"]))
    fast_sq = min(rounds_out, key=lambda x: float(x["sqlite_seconds"]))
    out.update(
        pg_rows=rows, pg_seconds=fast_pg["pg_seconds"],
        pg_rows_per_s=round(rows / fast_pg["pg_seconds"]),
        pg_replay_seconds=fast_pg["pg_replay_seconds"], pg_load_seconds=fast_pg["pg_load_seconds"],
        pg_verify_seconds=fast_pg["pg_verify_seconds"],
        sqlite_seconds=fast_sq["sqlite_seconds"],
        sqlite_rows_per_s=round(rows / fast_sq["sqlite_seconds"]),
        sqlite_replay_seconds=fast_sq["sqlite_replay_seconds"],
        sqlite_load_seconds=fast_sq["sqlite_load_seconds"],
        sqlite_verify_seconds=fast_sq["sqlite_verify_seconds"],
        copy_seconds=best("copy_seconds"), copy_key_after_seconds=best("copy_key_after_seconds"),
        sqlite_bare_seconds=best("sqlite_bare_seconds"), rounds=rounds_out,
    )
    out["copy_rows_per_s"] = round(rows / out["copy_seconds"])
    out["sqlite_bare_rows_per_s"] = round(rows / out["sqlite_bare_seconds"])
    out["pg_ratio"] = round(out["pg_rows_per_s"] / out["copy_rows_per_s"], 3)
    out["sqlite_ratio"] = round(out["sqlite_rows_per_s"] / out["sqlite_bare_rows_per_s"], 3)
    out["pg_ratio_vs_key_after_copy"] = round(out["copy_key_after_seconds"] / out["pg_seconds"],
                                              3)
    out["pg_ratio_median"] = round(statistics.median(x["pg_ratio"] for x in rounds_out), 3)
    out["sqlite_ratio_median"] = round(
        statistics.median(x["sqlite_ratio"] for x in rounds_out), 3)
    shutil.rmtree(hist, ignore_errors=True)

    if curve:
        base_events = max(events // 10, 10_000)
        base_keys = max(keys // 10, 1_000)
        by: dict[str, float] = {}
        for mult in (1, 3, 10):
            d = workdir / f"restore-curve-{mult}"
            shutil.rmtree(d, ignore_errors=True)
            st, _ = write_history(d, keys=base_keys, events=base_events * mult, seed=seed,
                                  log=lambda *_: None)
            cdb = workdir / f"curve-{mult}.db"
            cdb.unlink(missing_ok=True)
            dt_c, _, _ = await _restore(st, f"sqlite://{cdb}")
            by[f"{mult}x"] = round(dt_c, 2)
            cdb.unlink(missing_ok=True)
            shutil.rmtree(d, ignore_errors=True)
            log(f"restore: {mult}x history ({base_events * mult:,} events, "
                f"{base_keys:,} keys): {dt_c:.1f}s")
        out["restore_seconds_by_history"] = by
        out["curve"] = {"keys": base_keys, "events_1x": base_events, "target": "sqlite"}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.restore_bench")
    p.add_argument("--pg-dsn", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--events", type=int, default=5_000_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-curve", action="store_true")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    out = asyncio.run(restore_section(Path(args.workdir), pg_dsn=args.pg_dsn, keys=args.keys,
                                      events=args.events, seed=args.seed, log=log,
                                      curve=not args.no_curve))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
