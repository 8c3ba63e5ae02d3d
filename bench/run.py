"""``make bench``: run the benchmark sections, print a table, write ``bench/results/latest.json``.

Usage (from the repository root)::

    .venv/bin/python -m bench.run [--events 1000000] [--rounds 3] [--rpo-rate 20000]
                                  [--rpo-seconds 25] [--sections ingest,rpo] [--quick]
                                  [--compaction-keys 1000000] [--compaction-events 5000000]
                                  [--replicas-rate 10000] [--replicas-seconds 22]

The Kafka broker is ``--bootstrap`` / ``$KAFKA_BOOTSTRAP_SERVERS`` when given, else a local
single-node KRaft broker started (and stopped) by ``tests/kafka_service.py`` in a temporary
directory. Numbers are ratios against a limit measured in the same run (DESIGN.md §6): the
machine may be shared and noisy, absolute rates are for context.

Sections (see the modules for the exact method):

* ``ingest`` (bench/ingest_bench.py): pre-fill 3 topics x 3 partitions with N demo events,
  then alternate ``rounds`` times: bare aiokafka consume loop (``baseline_eps``) and
  ``replicator.ingest.Ingestor`` until all durable (``replicator_eps``). Reported rates are the
  **best** round of each (noise on a shared machine only ever slows a round down); medians are
  in the JSON too. ``ratio`` = best replicator / best baseline. ``bytes_per_event`` = segment
  bytes on disk / raw JSON value bytes.
* ``rpo`` (bench/rpo.py): publish-ack -> durable latency at a steady rate, publisher in a
  separate process, after a warm-up (``--rpo-warmup``, 5 s).
* ``compaction`` (bench/compaction_bench.py): a full snapshot from segments vs just reading
  them, its peak RSS, and restore time from a snapshot at 1x/3x/10x history (no Kafka).
* ``replicas`` (bench/replicas_bench.py): ``S3Store.put_file`` vs a bare multipart upload with
  the same client on a local versitygw (``s3_upload_ratio``), and follow-mode lag (block
  durable in a ``replicator run`` child -> committed by a follower process into SQLite) at a
  steady 10k events/s.

A local broker keeps its logs on tmpfs when there is room (``--broker-on-disk`` to keep them
on the replicator's disk): see :func:`broker_workdir` for why.

Every measured phase runs in a fresh process (a consumer's GC cost depends on what else is
on its heap). Takes ~2.5 min with cached events; the first run also generates the events
(~1 min on an idle 2-core machine, cached in bench/.cache/). Also writes a copy of the
results as ``bench/results/<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # allow ``python bench/run.py`` as well as ``-m bench.run``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import kafka_version, machine_info
from bench.events import load_events
from bench.ingest_bench import BASELINE_MAX_RECORDS, run_subprocess

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ingest_section(bootstrap: str, workdir: Path, events: int, seed: int, rounds: int
                   ) -> dict[str, Any]:
    state = workdir / "ingest-state.json"
    log(f"ingest: prefilling {events:,} events (3 topics x 3 partitions)")
    pre = run_subprocess("prefill", "--bootstrap", bootstrap, "--events", str(events),
                         "--seed", str(seed), "--state", str(state))
    total = pre["events"]
    log(f"ingest: prefill done in {pre['prefill_seconds']}s "
        f"({total / pre['prefill_seconds']:,.0f} events/s)")
    base: list[dict[str, Any]] = []
    repl: list[dict[str, Any]] = []
    common = ("--bootstrap", bootstrap, "--state", str(state))
    for r in range(rounds):
        b = run_subprocess("round", "--kind", "baseline", *common)
        log(f"ingest: round {r + 1} baseline   {b['eps']:>9,} events/s  "
            f"({b['seconds']:.2f}s, {b['cpu_us_per_event']} µs CPU/event)")
        if b["records"] != total:
            raise RuntimeError(f"baseline read {b['records']} records, expected {total}")
        base.append(b)
        rr = run_subprocess("round", "--kind", "replicator", *common,
                            "--workdir", str(workdir))
        log(f"ingest: round {r + 1} replicator {rr['eps']:>9,} events/s  "
            f"({rr['seconds']:.2f}s, {rr['cpu_us_per_event']} µs CPU/event)")
        if rr["records"] != total or rr["quarantined"]:
            raise RuntimeError(f"replicator stored {rr['records']} ({rr['quarantined']} "
                               f"quarantined), expected {total} valid events")
        repl.append(rr)
    # Informational, not part of the ratio: the bare loop with the young-generation GC
    # threshold the replicator sets while it runs (replicator.ingest.GC_YOUNG_THRESHOLD).
    from replicator.ingest import GC_YOUNG_THRESHOLD

    bt = run_subprocess("round", "--kind", "baseline", *common,
                        "--gc-young", str(GC_YOUNG_THRESHOLD))
    log(f"ingest: extra    baseline with the replicator's GC threshold {bt['eps']:>9,} "
        f"events/s (informational)")
    b_best = max(x["eps"] for x in base)
    r_best = max(x["eps"] for x in repl)
    b_med = statistics.median(x["eps"] for x in base)
    r_med = statistics.median(x["eps"] for x in repl)
    raw = pre["raw_value_bytes"]
    seg = repl[-1]["segment_bytes"]
    return {
        "events": total,
        "raw_value_bytes": raw,
        "mean_event_bytes": round(raw / total, 1),
        "prefill_seconds": pre["prefill_seconds"],
        "prefill": "aiokafka create_batch/send_batch, 1 MiB batches, acks=1, "
                   "compression none, 32 batches in flight",
        "rounds": rounds,
        "aggregate": "best",
        "baseline_eps": b_best,
        "replicator_eps": r_best,
        "ratio": round(r_best / b_best, 3),
        "baseline_eps_median": round(b_med),
        "replicator_eps_median": round(r_med),
        "ratio_median": round(r_med / b_med, 3),
        "baseline_cpu_us_per_event": min(x["cpu_us_per_event"] for x in base),
        "replicator_cpu_us_per_event": min(x["cpu_us_per_event"] for x in repl),
        "baseline_gc_tuned_eps": bt["eps"],
        "ratio_vs_gc_tuned_baseline": round(r_best / max(b_best, bt["eps"]), 3),
        "bytes_per_event": round(seg / raw, 4),
        "segment_bytes": seg,
        "baseline_max_records": BASELINE_MAX_RECORDS,
        "baseline_rounds": base,
        "replicator_rounds": repl,
    }


#: free memory a tmpfs must have to hold the local broker's logs (the ingest section's
#: pre-filled topics are ~0.6 GB, the rpo and replicas sections' topics ~0.5 GB)
TMPFS_NEEDED = 4 << 30


def broker_workdir(workdir: Path, on_disk: bool) -> tuple[Path, str]:
    """Where the local broker keeps its logs: on tmpfs (``/dev/shm``) unless ``on_disk`` or
    there is not enough room.

    In production the broker has its own disks. Here it shares the replicator's only disk,
    and the kernel's periodic writeback of the broker's log (~11 MB/s at 20k events/s, every
    ~5 s) makes the replicator's group-commit fsyncs wait behind it: 60-140 ms stalls, which
    then dominate the RPO p99 although no replicator code runs slower. With the broker's logs
    in memory the replicator's spool is still on the real disk and every fsync is real.
    """
    shm = Path("/dev/shm")
    if not on_disk and shm.is_dir():
        with contextlib.suppress(OSError):
            st = os.statvfs(shm)
            if st.f_bavail * st.f_frsize >= TMPFS_NEEDED:
                return Path(tempfile.mkdtemp(prefix="replicator-bench-kafka-", dir=shm)), \
                    "on tmpfs (/dev/shm): the broker's own disk"
    return workdir / "kafka", "on the replicator's disk"


def rpo_subprocess(bootstrap: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "bench.rpo", "--section", "--bootstrap", bootstrap,
         "--workdir", str(workdir), "--rate", str(args.rpo_rate),
         "--seconds", str(args.rpo_seconds), "--warmup", str(args.rpo_warmup),
         "--events", str(args.pool), "--seed", str(args.seed)],
        cwd=root, stdout=subprocess.PIPE, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench.rpo exited {proc.returncode}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _median(section: dict[str, Any], name: str) -> str:
    return f", median of rounds {section[name]:.3f}" if name in section else ""


def restore_subprocess(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The restore section in a fresh process, against a private PostgreSQL (pg.sh)."""
    root = Path(__file__).resolve().parent.parent
    pg_dir = workdir / "pg"
    dsn = os.environ.get("REPLICATOR_BENCH_PG_DSN", "").strip()
    if not dsn:
        log("starting a private PostgreSQL (deploy/postgres/pg.sh)")
        dsn = subprocess.run(
            ["bash", str(root / "deploy" / "postgres" / "pg.sh"), "start", "--dir", str(pg_dir)],
            stdout=subprocess.PIPE, text=True, check=True,
        ).stdout.strip().splitlines()[-1]
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.restore_bench", "--pg-dsn", dsn, "--workdir",
             str(workdir), "--keys", str(args.restore_keys), "--events",
             str(args.restore_events), "--seed", str(args.seed)],
            cwd=root, stdout=subprocess.PIPE, text=True, check=False,
        )
    finally:
        if pg_dir.exists():
            subprocess.run(["bash", str(root / "deploy" / "postgres" / "pg.sh"), "stop",
                            "--dir", str(pg_dir)], check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.restore_bench exited {proc.returncode}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def compaction_subprocess(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The compaction section (its own process; it starts one more per measured step)."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "bench.compaction_bench", "section", "--workdir", str(workdir),
         "--keys", str(args.compaction_keys), "--events", str(args.compaction_events),
         "--seed", str(args.seed)],
        cwd=root, stdout=subprocess.PIPE, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench.compaction_bench exited {proc.returncode}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def ops_subprocess(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Verify (full, incremental, deep) and drill on one synthetic store, own process."""
    root = Path(__file__).resolve().parent.parent
    out = workdir / "ops.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.verify_bench", "--workdir", str(workdir / "ops"),
         "--events", str(args.ops_events), "--out", str(out)],
        cwd=root, stdout=subprocess.DEVNULL, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench.verify_bench exited {proc.returncode}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def replicas_subprocess(bootstrap: str, workdir: Path, args: argparse.Namespace
                        ) -> dict[str, Any]:
    """The replicas section (its own process; it starts versitygw, the service, a follower
    and the rpo publisher as further processes)."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "bench.replicas_bench", "section", "--workdir",
         str(workdir / "replicas"), "--bootstrap", bootstrap, "--rate", str(args.replicas_rate),
         "--seconds", str(args.replicas_seconds), "--events", str(args.pool),
         "--seed", str(args.seed), "--rounds", str(args.rounds),
         "--files", str(args.s3_files)],
        cwd=root, stdout=subprocess.PIPE, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench.replicas_bench exited {proc.returncode}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _table(results: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str]] = []
    ing = results["sections"].get("ingest")
    if ing:
        rows += [
            ("ingest", "events", f"{ing['events']:,} ({ing['mean_event_bytes']} B mean)"),
            ("ingest", "baseline_eps", f"{ing['baseline_eps']:,} "
                                       f"(median {ing['baseline_eps_median']:,})"),
            ("ingest", "replicator_eps", f"{ing['replicator_eps']:,} "
                                         f"(median {ing['replicator_eps_median']:,})"),
            ("ingest", "ratio", f"{ing['ratio']:.3f} (median {ing['ratio_median']:.3f}; "
                                f"goal >= 0.5, stretch 0.8)"),
            ("ingest", "(info) gc-tuned baseline",
             f"{ing['baseline_gc_tuned_eps']:,} -> ratio "
             f"{ing['ratio_vs_gc_tuned_baseline']:.3f}"),
            ("ingest", "cpu µs/event", f"baseline {ing['baseline_cpu_us_per_event']}, "
                                       f"replicator {ing['replicator_cpu_us_per_event']}"),
            ("ingest", "bytes_per_event", f"{ing['bytes_per_event']:.4f} (goal <= 0.3)"),
        ]
    rst = results["sections"].get("restore")
    if rst:
        rows += [
            ("restore", "history", f"{rst['keys']:,} keys, {rst['events']:,} events"),
            ("restore", "pg_rows_per_s", f"{rst['pg_rows_per_s']:,} (replay "
                                         f"{rst['pg_replay_seconds']}s, load "
                                         f"{rst['pg_load_seconds']}s)"),
            ("restore", "copy_rows_per_s", f"{rst['copy_rows_per_s']:,} (bare binary COPY)"),
            ("restore", "pg_ratio", f"{rst['pg_ratio']:.3f} (goal >= 0.75)"
                                    + _median(rst, "pg_ratio_median")),
            ("restore", "sqlite_rows_per_s", f"{rst['sqlite_rows_per_s']:,} vs bare "
                                             f"{rst['sqlite_bare_rows_per_s']:,}"),
            ("restore", "sqlite_ratio", f"{rst['sqlite_ratio']:.3f} (goal >= 0.6)"
                                        + _median(rst, "sqlite_ratio_median")),
        ]
        if "pg_ratio_vs_key_after_copy" in rst:
            rows.append(("restore", "pg vs COPY, key after",
                         f"{rst['pg_ratio_vs_key_after_copy']:.3f} (COPY into the table "
                         f"without its key, key built after: {rst['copy_key_after_seconds']}s)"))
        if "restore_seconds_by_history" in rst:
            rows.append(("restore", "seconds by history",
                         ", ".join(f"{k} {v}s" for k, v in
                                   rst["restore_seconds_by_history"].items())))
    cmp = results["sections"].get("compaction")
    if cmp:
        ph = cmp.get("phases", {})
        rows += [
            ("compaction", "history", f"{cmp['keys']:,} keys, {cmp['events']:,} events, "
                                      f"{cmp['spilled_runs']} spilled runs"),
            ("compaction", "events_per_s", f"{cmp['events_per_s']:,} (full, "
                                           f"{cmp['compaction_seconds']}s)"),
            ("compaction", "read_events_per_s", f"{cmp['read_events_per_s']:,} "
                                                "(segments + record framing only)"),
            ("compaction", "ratio", f"{cmp['ratio']:.3f} (goal >= 0.3; by CPU time "
                                    f"{cmp.get('cpu_ratio')})"),
            ("compaction", "phases", ", ".join(f"{k.removesuffix('_s')} {v}s"
                                               for k, v in ph.items())),
            ("compaction", "peak_rss_mb", f"{cmp['peak_rss_mb']} (anon "
                                          f"{cmp['peak_rss_anon_mb']}; budget "
                                          f"{cmp['budget']:,})"),
            ("compaction", "bytes_per_live_key", f"{cmp['bytes_per_live_key']} (anon "
                                                 f"{cmp['anon_bytes_per_live_key']})"),
        ]
        if "restore_seconds_by_history" in cmp:
            rows += [
                ("compaction", "restore s by history",
                 ", ".join(f"{k} {v}s" for k, v in cmp["restore_seconds_by_history"].items())
                 + " (from a full snapshot)"),
                ("compaction", "history_10x_over_1x",
                 f"{cmp['history_10x_over_1x']:.3f} (goal <= 1.3)"),
            ]
    ops = results["sections"].get("ops")
    if ops:
        st = ops["store"]
        rows += [
            ("ops", "store", f"{ops['events']:,} events, {st['segments']} segments + "
                             f"{st['snapshot_files']} snapshot files, "
                             f"{(st['segment_bytes'] + st['snapshot_bytes']) / 1e6:.0f} MB"),
            ("ops", "verify full / incremental", f"{ops['full']['seconds']}s / "
                                                 f"{ops['incremental']['seconds']}s "
                                                 f"({ops['full_over_incremental']}x)"),
            ("ops", "verify --deep first / again", f"{ops['deep_first']['seconds']}s / "
                                                   f"{ops['deep_again']['seconds']}s"),
        ]
        for mode, d in ops.get("drill", {}).items():
            rows.append(("ops", f"drill {mode}", f"RTO {d['rto_s']}s (extrapolated "
                                                 f"{d['rto_extrapolated_s']}s), "
                                                 f"{sum(d['rows'].values()):,} rows, "
                                                 f"{d['bytes_read'] / 1e6:.0f} MB read"))
    rpo = results["sections"].get("rpo")
    if rpo:
        rows += [
            ("rpo", "rate", f"{rpo['rate_achieved']:,}/s for {rpo['publish_seconds']}s "
                            f"({rpo['events']:,} events, the first {rpo.get('warmup_s', 0)}s "
                            "not measured)"),
            ("rpo", "rpo_p50_ms", f"{rpo['rpo_p50_ms']}"),
            ("rpo", "rpo_p99_ms", f"{rpo['rpo_p99_ms']}  (p99.9 {rpo['rpo_p999_ms']}, "
                                  f"max {rpo['rpo_max_ms']})"),
            ("rpo", "ack_to_fetched_ms", f"p50 {rpo.get('ack_to_fetched_p50_ms')}, "
                                         f"p99 {rpo.get('ack_to_fetched_p99_ms')}"),
            ("rpo", "fetched_to_durable_ms", f"p50 {rpo.get('fetched_to_durable_p50_ms')}, "
                                             f"p99 {rpo.get('fetched_to_durable_p99_ms')}"),
            ("rpo", "baseline_fetch_ms",
             f"p50 {rpo.get('baseline', {}).get('fetch_p50_ms')}, "
             f"p99 {rpo.get('baseline', {}).get('fetch_p99_ms')} "
             "(bare consumer, same publisher)"),
            ("rpo", "durable_before_ack", f"{rpo['durable_before_ack']:,}"),
            ("rpo", "bytes_per_event", f"{rpo['bytes_per_event']}"),
        ]
    rep = results["sections"].get("replicas")
    if rep:
        cpu = rep.get("cpu_steady", {})
        rows += [
            ("replicas", "s3_upload_mb_per_s", f"{rep['s3_upload_mb_per_s']} MiB/s (median "
                                               f"{rep['s3_upload_mb_per_s_median']}; "
                                               f"{rep['s3_files']} x {rep['s3_file_mib']} MiB)"),
            ("replicas", "bare_upload_mb_per_s", f"{rep['bare_upload_mb_per_s']} MiB/s (median "
                                                 f"{rep['bare_upload_mb_per_s_median']}; same "
                                                 "client, no MD5/SHA-256)"),
            ("replicas", "s3_upload_ratio", f"{rep['s3_upload_ratio']:.3f} (median "
                                            f"{rep['s3_upload_ratio_median']:.3f}; goal >= 0.8)"),
            ("replicas", "rate", f"{rep['rate_achieved']:,}/s for {rep['publish_seconds']}s "
                                 f"({rep['events']:,} events)"),
            ("replicas", "follow_lag_p50_ms", f"{rep['follow_lag_p50_ms']}"),
            ("replicas", "follow_lag_p99_ms", f"{rep['follow_lag_p99_ms']} (max "
                                              f"{rep['follow_lag_max_ms']}, {rep['samples']:,} "
                                              "samples; goal <= 1000)"),
            ("replicas", "follow_applied_eps", f"{rep['follow_applied_eps']} ("
                                               f"{rep['applied_events']:,} applied, caught up "
                                               f"{rep['catch_up_s']}s after the last ack)"),
            ("replicas", "follower cpu", f"{rep['follower_cpu_us_per_event']} µs/event; batches "
                                         f"p50 {rep['follower_batch_events_p50']} events"),
            ("replicas", "cpu in steady phase",
             f"machine {cpu.get('machine_busy_fraction')} busy, service "
             f"{cpu.get('service_cpu_s')}s, follower {cpu.get('follower_cpu_s')}s "
             f"of {cpu.get('seconds')}s"),
        ]
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"replicator bench {results['date']}")
        for c in ("section", "metric", "value"):
            t.add_column(c)
        for r in rows:
            t.add_row(*r)
        Console().print(t)
    except ImportError:
        for r in rows:
            print(f"{r[0]:<10} {r[1]:<20} {r[2]}")


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    started = datetime.now(UTC)
    results: dict[str, Any] = {
        "date": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_info(),
        "args": {k: v for k, v in vars(args).items()},
        "method": {
            "processes": "prefill, every round and the rpo section each run in a fresh "
                         "process; the rpo publisher is one more process",
            "aggregate": "best of the rounds (noise on a shared machine only slows a round "
                         "down); medians alongside",
            "clock": "from partition assignment to the last record returned (baseline) / "
                     "to every partition durable at its end offset (replicator)",
        },
        "sections": {},
    }
    workdir = Path(tempfile.mkdtemp(prefix="replicator-bench-"))
    stop_broker = None
    broker_dir: Path | None = None  # a local broker's state, when this run starts one
    where = ""
    try:
        if "restore" in sections:
            results["sections"]["restore"] = restore_subprocess(workdir, args)
        if "compaction" in sections:
            log("compaction: section start (bench/compaction_bench.py)")
            results["sections"]["compaction"] = compaction_subprocess(workdir, args)
        if "ops" in sections:
            log("ops: section start (bench/verify_bench.py: verify and drill)")
            results["sections"]["ops"] = ops_subprocess(workdir, args)
        if not {"ingest", "rpo", "replicas"} & set(sections):
            return results
        bootstrap = args.bootstrap or os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
        local = not bootstrap
        if local:
            from tests.kafka_service import start_local_broker

            broker_dir, where = broker_workdir(workdir, args.broker_on_disk)
            log(f"starting a local Kafka broker (deploy/kafka/kafka.sh), its logs {where}")
            broker = await asyncio.to_thread(start_local_broker, broker_dir)
            bootstrap = broker.bootstrap
            stop_broker = broker.stop
        results["kafka"] = {"bootstrap": bootstrap, "local_broker": local,
                            "version": kafka_version(local),
                            "broker_logs": where or None}
        # the events are generated (or loaded from bench/.cache) once, here, for both sections
        args.pool = max(args.events, int(args.rpo_rate * (args.rpo_seconds + args.rpo_warmup)),
                        int(args.replicas_rate * args.replicas_seconds))
        load_events(args.pool, seed=args.seed, log=log)
        if "ingest" in sections:
            results["sections"]["ingest"] = ingest_section(
                bootstrap, workdir, args.events, args.seed, args.rounds)
        if "rpo" in sections:
            results["sections"]["rpo"] = rpo_subprocess(bootstrap, workdir, args)
        if "replicas" in sections:
            log("replicas: section start (bench/replicas_bench.py)")
            results["sections"]["replicas"] = replicas_subprocess(bootstrap, workdir, args)
    finally:
        results["machine"]["loadavg_end"] = list(os.getloadavg())
        results["duration_s"] = round((datetime.now(UTC) - started).total_seconds(), 1)
        if stop_broker is not None:
            log("stopping the local broker")
            await asyncio.to_thread(stop_broker)
        shutil.rmtree(workdir, ignore_errors=True)
        if broker_dir is not None and not broker_dir.is_relative_to(workdir):
            shutil.rmtree(broker_dir, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="replicator benchmarks (make bench)")
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rpo-rate", type=float, default=20_000)
    p.add_argument("--rpo-seconds", type=float, default=25)
    p.add_argument("--rpo-warmup", type=float, default=5,
                   help="rpo: seconds published before the measured ones (not measured)")
    p.add_argument("--broker-on-disk", action="store_true",
                   help="keep the local broker's logs on the replicator's disk instead of "
                        "tmpfs (shows the fsync stalls a shared disk causes)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sections", default="ingest,rpo,restore,compaction,ops,replicas")
    p.add_argument("--restore-keys", type=int, default=1_000_000)
    p.add_argument("--restore-events", type=int, default=5_000_000)
    p.add_argument("--compaction-keys", type=int, default=1_000_000)
    p.add_argument("--compaction-events", type=int, default=5_000_000)
    p.add_argument("--ops-events", type=int, default=1_000_000,
                   help="ops: events of the store verify and drill run on")
    p.add_argument("--replicas-rate", type=float, default=10_000)
    p.add_argument("--replicas-seconds", type=float, default=22)
    p.add_argument("--s3-files", type=int, default=4, help="replicas: files of 64 MiB")
    p.add_argument("--bootstrap", default=None, help="use this broker instead of starting one")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "latest.json")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 200k events, 1 round, 8 s of RPO and of follow")
    args = p.parse_args(argv)
    if args.quick:
        args.events, args.rounds, args.rpo_seconds = 200_000, 1, 8
        args.replicas_seconds, args.s3_files = 8, 2
        args.restore_keys, args.restore_events = 50_000, 250_000
        args.compaction_keys, args.compaction_events = 50_000, 250_000
        args.ops_events = 100_000
    results = asyncio.run(amain(args))
    # sections not run this time keep their previous figures (each says when it was measured)
    for sec in results["sections"].values():
        sec.setdefault("measured_at", results["date"])
    if args.out.exists():
        with contextlib.suppress(ValueError, KeyError, OSError):
            previous = json.loads(args.out.read_text())
            for name, sec in previous.get("sections", {}).items():
                if name not in results["sections"]:
                    sec.setdefault("measured_at", previous.get("date"))
                    results["sections"][name] = sec
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, default=str)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, args.out)
    if args.out.name == "latest.json":
        stamp = results["date"].replace(":", "").replace("-", "")
        (args.out.parent / f"{stamp}.json").write_text(text + "\n")
    _table(results)
    log(f"wrote {args.out} ({results['duration_s']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
