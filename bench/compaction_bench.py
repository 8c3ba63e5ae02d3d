"""Section ``compaction``: full snapshots from segments, their memory, and restore time vs history.

History: the restore section's synthetic attendance history (``bench.restore_bench.
write_history``: ``keys`` records over 3 partitions, ``events`` changes, real sealed segment
files in a local store, one topic ``attendance``). Measured, every phase in a fresh process:

* ``events_per_s``: ``replicator.compaction.runner.compact(kind="full")`` with no snapshot in
  the store (so from segments only: fold, spilled sorted runs, k-way merge, write, verify,
  put, re-read of the stored copy, manifest) -- events read / wall time of ``compact``;
* ``read_events_per_s``: the limit, just reading the same segments in the same run:
  ``SegmentReader(expect_sealed=True).iter_block_payloads()`` (checksum + decompression) and
  walking every record's framing with ``segment.format.iter_records``; ``ratio`` =
  ``events_per_s / read_events_per_s``. The read runs before and after the compaction; the
  faster of the two is used (the conservative denominator); ``cpu_ratio`` is the same ratio
  with CPU seconds (user + sys, all threads) instead of wall time, steadier when shared;
* ``phases``: fold (read + decode + buffer), spill (sort + write the runs), final sort,
  merge + write, verify (the built file and the stored copy), other (plan, put, manifest) --
  timed by wrapping the module functions of ``replicator.compaction`` in the measured process;
* ``peak_rss_mb`` (``ru_maxrss`` of the compaction process) and ``bytes_per_live_key`` =
  (peak RSS - RSS before ``compact``) / live keys, with the default budget; the RSS includes
  the mmap'ed segment pages the reader touched, ``peak_rss_anon_mb`` (sampled every 50 ms)
  is the heap alone;
* ``restore_seconds_by_history``: 1/10 of the keys, 1x, 3x and 10x the events of 1/10 of the
  history; each history gets a full snapshot at its end, then ``restore --at latest`` into
  SQLite (plan + replay from the snapshot chain + load) is timed, best of 2 fresh processes;
  ``history_10x_over_1x``.

Run alone: ``python -m bench.compaction_bench section --workdir DIR [--keys 1000000
--events 5000000]``; the measured steps are subcommands (``compact``, ``read``,
``restore``) so that they can be profiled, e.g. ``py-spy record -o prof.txt -f raw --
.venv/bin/python -m bench.compaction_bench compact --store DIR/store --work DIR/work``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.restore_bench import PARTITIONS, write_history

#: the topics ``write_history`` writes
TOPICS = ["attendance"]
CURVE = (1, 3, 10)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


class _AnonPeak:
    """Samples ``RssAnon`` (heap, without file-backed mmap pages) in a daemon thread."""

    def __init__(self, interval: float = 0.05) -> None:
        self.peak = _status_mb("RssAnon")
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, _status_mb("RssAnon"))

    def __enter__(self) -> _AnonPeak:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _status_mb("RssAnon"))


def segment_files(store_root: Path) -> list[tuple[Path, str]]:
    return [(p, p.relative_to(store_root).as_posix())
            for p in sorted(store_root.rglob("*.seg"))]


# --- measured steps (each in a fresh process, see ``run_child``) -----------------------------

def read_step(store_root: Path) -> dict[str, Any]:
    """The limit: checked block payloads + record framing of every segment, records counted."""
    from replicator.segment.format import iter_records
    from replicator.segment.reader import SegmentReader

    files = segment_files(store_root)
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    records = 0
    for path, name in files:
        with SegmentReader(path, name=name, expect_sealed=True) as r:
            for _meta, raw in r.iter_block_payloads():
                for _rec in iter_records(raw):
                    records += 1
    dt = time.perf_counter() - t0
    cpu = _cpu_s() - cpu0
    return {"events": records, "seconds": round(dt, 3), "events_per_s": round(records / dt),
            "cpu_seconds": round(cpu, 3), "events_per_cpu_s": round(records / cpu),
            "files": len(files), "bytes": sum(p.stat().st_size for p, _ in files)}


class _Phases:
    """Wraps ``replicator.compaction`` functions (in this process only) to time the phases."""

    def __init__(self) -> None:
        import replicator.compaction.build as build
        import replicator.compaction.runner as runner

        self.build_s = 0.0
        self.verify_s = 0.0
        self.spill_s = 0.0
        self.fold_s = 0.0
        self.final_sort_s = 0.0
        self.merge_write_s = 0.0
        self._sorts: list[tuple[float, float]] = []
        clock = time.perf_counter
        # module globals, looked up at call time by compact() / build_topic()
        rns, bns = vars(runner), vars(build)
        orig_build, orig_check = rns["build_topic"], rns["_check_file"]
        orig_sorted, orig_write = bns["_sorted_entries"], bns["_write_run"]

        def sorted_entries(*a: Any, **k: Any) -> Any:
            t = clock()
            out = orig_sorted(*a, **k)
            self._sorts.append((t, clock()))
            return out

        def write_run(*a: Any, **k: Any) -> None:
            t = clock()
            orig_write(*a, **k)
            self.spill_s += clock() - t

        def build_topic(*a: Any, **k: Any) -> Any:
            self._sorts.clear()
            spill0 = self.spill_s
            t = clock()
            out = orig_build(*a, **k)
            end = clock()
            self.build_s += end - t
            (ls, le), spills = self._sorts[-1], self._sorts[:-1]
            sort_s = sum(b - a for a, b in spills)
            self.spill_s += sort_s
            self.fold_s += ls - t - (self.spill_s - spill0)
            self.final_sort_s += le - ls
            self.merge_write_s += end - le
            return out

        def check_file(*a: Any, **k: Any) -> None:
            t = clock()
            orig_check(*a, **k)
            self.verify_s += clock() - t

        bns["_sorted_entries"], bns["_write_run"] = sorted_entries, write_run
        rns["build_topic"], rns["_check_file"] = build_topic, check_file

    def to_json(self, total: float) -> dict[str, float]:
        return {"fold_s": round(self.fold_s, 2), "spill_s": round(self.spill_s, 2),
                "final_sort_s": round(self.final_sort_s, 2),
                "merge_write_s": round(self.merge_write_s, 2),
                "verify_s": round(self.verify_s, 2),
                "other_s": round(total - self.build_s - self.verify_s, 2)}


def compact_step(store_root: Path, work_dir: Path, budget: int, phases: bool = True
                 ) -> dict[str, Any]:
    """One full compaction of ``store_root`` (in-process), with memory and phase figures."""
    from replicator.catalog import Catalog
    from replicator.compaction.runner import compact
    from replicator.schemas import SchemaRegistry
    from replicator.snapshot.tiers import Tiers
    from replicator.storage.local import LocalStore

    ph = _Phases() if phases else None
    reg = SchemaRegistry.load()
    cat = Catalog(store=LocalStore(root=store_root), data_dir=None)
    tiers = Tiers.for_store(cat.store)
    rss0, cur0, anon0 = _maxrss_mb(), _status_mb("VmRSS"), _status_mb("RssAnon")
    cpu0 = _cpu_s()
    with _AnonPeak() as anon:
        report = asyncio.run(compact(cat, tiers, reg, TOPICS, "full", work_dir=work_dir,
                                     budget=budget))
    peak = _maxrss_mb()
    cpu = _cpu_s() - cpu0
    live = sum(f.live for f in report.manifest.files)
    out: dict[str, Any] = {
        "events": report.events, "seconds": round(report.seconds, 3),
        "events_per_s": round(report.events / report.seconds),
        "cpu_seconds": round(cpu, 3), "events_per_cpu_s": round(report.events / cpu),
        "live_keys": live, "entries": sum(f.entries for f in report.manifest.files),
        "snapshot_bytes": report.manifest.size, "bytes_read": report.bytes_read,
        "spilled_runs": report.runs, "merged_layers": len(report.plan.layers),
        "snapshot_id": report.manifest.id, "budget": budget,
        "rss_before_mb": round(max(rss0, cur0), 1), "peak_rss_mb": round(peak, 1),
        "rss_anon_before_mb": round(anon0, 1), "peak_rss_anon_mb": round(anon.peak, 1),
        "bytes_per_live_key": round((peak - max(rss0, cur0)) * 2**20 / max(live, 1), 1),
        "anon_bytes_per_live_key": round((anon.peak - anon0) * 2**20 / max(live, 1), 1),
    }
    if ph is not None:
        out["phases"] = ph.to_json(report.seconds)
    return out


def restore_step(store_root: Path, db: Path, use_snapshots: bool = True) -> dict[str, Any]:
    """``restore --at latest`` into a fresh SQLite file: plan + replay + load, timed."""
    from replicator.catalog import Catalog
    from replicator.restore.point import Latest
    from replicator.restore.runner import execute_restore, make_plan
    from replicator.schemas import SchemaRegistry
    from replicator.storage.local import LocalStore

    async def run() -> dict[str, Any]:
        reg = SchemaRegistry.load()
        cat = Catalog(store=LocalStore(root=store_root), data_dir=None)
        db.unlink(missing_ok=True)
        t0 = time.perf_counter()
        plan = await make_plan(cat, reg, TOPICS, Latest(), use_snapshots=use_snapshots)
        rep = await execute_restore(cat, reg, plan, f"sqlite://{db}")
        dt = time.perf_counter() - t0
        db.unlink(missing_ok=True)
        j = rep.to_json()
        return {"seconds": round(dt, 3), "rows": sum(r.rows for r in rep.results),
                "snapshots": [m.id for m in plan.snapshots],
                "segment_events_estimate": sum(p.events_estimate for p in plan.partitions),
                "replay_seconds": j.get("replay_seconds"), "load_seconds": j.get("load_seconds")}

    return asyncio.run(run())


def run_child(*argv: str) -> dict[str, Any]:
    """``python -m bench.compaction_bench <argv>`` in a fresh process; its last stdout line."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "bench.compaction_bench", *argv], cwd=root,
                          stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.compaction_bench {argv[0]} exited {proc.returncode}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# --- the section ------------------------------------------------------------------------------

def compaction_section(workdir: Path, *, keys: int, events: int, seed: int, budget: int,
                       curve: bool = True, segments_only_curve: bool = False,
                       log: Callable[[str], None] = log) -> dict[str, Any]:
    out: dict[str, Any] = {"keys": keys, "events": events, "partitions": PARTITIONS,
                           "topics": TOPICS, "budget": budget}
    hist = workdir / "compaction-history"
    shutil.rmtree(hist, ignore_errors=True)
    t0 = time.monotonic()
    log(f"compaction: writing the history ({keys:,} keys, {events:,} events)")
    write_history(hist, keys=keys, events=events, seed=seed,
                  log=lambda m: log(m.replace("restore:", "compaction:")))
    out["history_write_seconds"] = round(time.monotonic() - t0, 1)
    store = hist / "store"
    try:
        r1 = run_child("read", "--store", str(store))
        log(f"compaction: read limit {r1['events_per_s']:,} events/s ({r1['seconds']}s)")
        c = run_child("compact", "--store", str(store), "--work", str(hist / "work"),
                      "--budget", str(budget))
        log(f"compaction: full {c['events_per_s']:,} events/s ({c['seconds']}s, "
            f"{c['spilled_runs']} runs), peak RSS {c['peak_rss_mb']} MiB; phases {c['phases']}")
        r2 = run_child("read", "--store", str(store))
        log(f"compaction: read limit {r2['events_per_s']:,} events/s ({r2['seconds']}s)")
    finally:
        shutil.rmtree(hist, ignore_errors=True)
    if c["events"] != events or r1["events"] != events:
        raise RuntimeError(f"compaction read {c['events']} / reader {r1['events']} events, "
                           f"expected {events}")
    if c["live_keys"] != keys:
        raise RuntimeError(f"snapshot has {c['live_keys']} live keys, expected {keys}")
    read_eps = max(r1["events_per_s"], r2["events_per_s"])
    out.update(
        events_per_s=c["events_per_s"], read_events_per_s=read_eps,
        ratio=round(c["events_per_s"] / read_eps, 3), compaction_seconds=c["seconds"],
        read_seconds=min(r1["seconds"], r2["seconds"]),
        read_events_per_s_rounds=[r1["events_per_s"], r2["events_per_s"]],
        # CPU time (all threads) is less sensitive to a shared, loaded machine than wall time
        events_per_cpu_s=c["events_per_cpu_s"],
        read_events_per_cpu_s=max(r1["events_per_cpu_s"], r2["events_per_cpu_s"]),
        cpu_ratio=round(c["events_per_cpu_s"]
                        / max(r1["events_per_cpu_s"], r2["events_per_cpu_s"]), 3),
        segment_bytes=r1["bytes"], segment_files=r1["files"],
        phases=c["phases"], peak_rss_mb=c["peak_rss_mb"], rss_before_mb=c["rss_before_mb"],
        bytes_per_live_key=c["bytes_per_live_key"], peak_rss_anon_mb=c["peak_rss_anon_mb"],
        anon_bytes_per_live_key=c["anon_bytes_per_live_key"], live_keys=c["live_keys"],
        snapshot_bytes=c["snapshot_bytes"], spilled_runs=c["spilled_runs"],
    )
    if curve:
        out.update(history_curve(workdir, keys=max(keys // 10, 1_000),
                                 events=max(events // 10, 10_000), seed=seed, budget=budget,
                                 segments_only=segments_only_curve, log=log))
    return out


def history_curve(workdir: Path, *, keys: int, events: int, seed: int, budget: int,
                  segments_only: bool, log: Callable[[str], None]) -> dict[str, Any]:
    by: dict[str, float] = {}
    seg_only: dict[str, float] = {}
    comp: dict[str, float] = {}
    rounds_by: dict[str, list[float]] = {}
    for mult in CURVE:
        d = workdir / f"compaction-curve-{mult}"
        shutil.rmtree(d, ignore_errors=True)
        try:
            write_history(d, keys=keys, events=events * mult, seed=seed, log=lambda *_: None)
            store, db = d / "store", d / "restore.db"
            if segments_only:
                s = run_child("restore", "--store", str(store), "--db", str(db),
                              "--segments-only")
                seg_only[f"{mult}x"] = s["seconds"]
            c = run_child("compact", "--store", str(store), "--work", str(d / "work"),
                          "--budget", str(budget), "--no-phases")
            comp[f"{mult}x"] = c["seconds"]
            # best of 2 fresh processes: a 100k-row restore takes seconds, noise is large;
            # flush the dirty pages of the history just written first, or the restore's own
            # fsyncs wait behind their writeback (worst for the biggest history)
            os.sync()
            rounds = [run_child("restore", "--store", str(store), "--db", str(db))
                      for _ in range(2)]
            for r in rounds:
                if not r["snapshots"] or r["rows"] != keys:
                    raise RuntimeError(f"{mult}x restore: snapshots {r['snapshots']}, "
                                       f"rows {r['rows']} (expected {keys})")
            r = min(rounds, key=lambda x: float(x["seconds"]))
            by[f"{mult}x"] = r["seconds"]
            rounds_by[f"{mult}x"] = [x["seconds"] for x in rounds]
            log(f"compaction: {mult}x history ({events * mult:,} events, {keys:,} keys): "
                f"compact {c['seconds']}s, restore from the snapshot {r['seconds']}s "
                f"(replay {r['replay_seconds']}s, load {r['load_seconds']}s)"
                + (f", segments only {seg_only[f'{mult}x']}s" if segments_only else ""))
        finally:
            shutil.rmtree(d, ignore_errors=True)
    out: dict[str, Any] = {
        "restore_seconds_by_history": by,
        "history_10x_over_1x": round(by["10x"] / by["1x"], 3),
        "restore_seconds_by_history_rounds": rounds_by,
        "compaction_seconds_by_history": comp,
        "curve": {"keys": keys, "events_1x": events, "target": "sqlite",
                  "snapshot": "full, at the end of each history"},
    }
    if segments_only:
        out["restore_seconds_by_history_segments_only"] = seg_only
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compaction_bench")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("section", help="the whole section; prints its JSON")
    s.add_argument("--workdir", type=Path, required=True)
    s.add_argument("--keys", type=int, default=1_000_000)
    s.add_argument("--events", type=int, default=5_000_000)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--budget", type=int, default=None, help="default: DEFAULT_BUDGET")
    s.add_argument("--no-curve", action="store_true")
    s.add_argument("--segments-only-curve", action="store_true",
                   help="also time each curve restore without snapshots")
    c = sub.add_parser("compact", help="one full compaction of --store")
    c.add_argument("--store", type=Path, required=True)
    c.add_argument("--work", type=Path, required=True)
    c.add_argument("--budget", type=int, default=None)
    c.add_argument("--no-phases", action="store_true")
    r = sub.add_parser("read", help="read every segment of --store (the limit)")
    r.add_argument("--store", type=Path, required=True)
    rs = sub.add_parser("restore", help="restore --store at latest into SQLite --db")
    rs.add_argument("--store", type=Path, required=True)
    rs.add_argument("--db", type=Path, required=True)
    rs.add_argument("--segments-only", action="store_true")
    args = p.parse_args(argv)

    from replicator.compaction.build import DEFAULT_BUDGET

    out: dict[str, Any]
    if args.cmd == "section":
        args.workdir.mkdir(parents=True, exist_ok=True)
        out = compaction_section(args.workdir, keys=args.keys, events=args.events,
                                 seed=args.seed, budget=args.budget or DEFAULT_BUDGET,
                                 curve=not args.no_curve,
                                 segments_only_curve=args.segments_only_curve)
    elif args.cmd == "compact":
        out = compact_step(args.store, args.work, args.budget or DEFAULT_BUDGET,
                           phases=not args.no_phases)
    elif args.cmd == "read":
        out = read_step(args.store)
    else:
        out = restore_step(args.store, args.db, use_snapshots=not args.segments_only)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
