"""Section ``ingest``: replicator ingest throughput vs a bare aiokafka consume loop.

Both sides read the same pre-filled topics from the beginning to the end offsets taken
after the prefill, each round with a fresh consumer group. The clock starts when the group
assigns the partitions (the rebalance listener is entered) and stops when

* baseline: the last record of every partition was returned by ``getmany``;
* replicator: every partition's ``PartitionLog.durable`` reached its end offset, i.e. the
  records were framed, lz4-compressed, written and fsync'd (polled every 5 ms).

Group join time is reported separately (``join_s``) and not part of the rate.

Every phase runs in a fresh process (``python -m bench.ingest_bench prefill|round ...``,
driven by bench/run.py): a consumer's garbage-collection cost grows with everything else
on the process heap, so neither side may share a process with the million pre-serialised
events (or with the other side).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from bench.common import (
    INGEST_CONSUMER_OPTIONS,
    create_topics,
    prefill,
    replicator_config,
    segment_bytes,
    unique,
)
from replicator.config import KafkaSettings
from replicator.ingest import Ingestor

#: getmany max_records of the baseline: the replicator's default kafka.max_poll_records, so
#: both fetch and drain alike. (Larger is not faster for a bare loop: each batch's records
#: are alive together, and the collector's full passes grow with them.)
BASELINE_MAX_RECORDS = KafkaSettings().max_poll_records


class _Assigned(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.at: float | None = None

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        pass

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        if assigned and self.at is None:
            self.at = time.perf_counter()


async def baseline_round(
    bootstrap: str, topics: list[str], ends: dict[TopicPartition, int],
    max_records: int = BASELINE_MAX_RECORDS,
) -> dict[str, Any]:
    """Bare aiokafka consume loop: getmany, touch each value's length, nothing else."""
    gc.collect()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=unique("bench-baseline"),
        session_timeout_ms=10000, heartbeat_interval_ms=3000, **INGEST_CONSUMER_OPTIONS,
    )
    await consumer.start()
    listener = _Assigned()
    try:
        consumer.subscribe(topics=topics, listener=listener)
        remaining = {tp: end for tp, end in ends.items() if end > 0}
        records = 0
        nbytes = 0
        t_sub = time.perf_counter()
        cpu0 = time.process_time()
        while remaining:
            batches = await consumer.getmany(timeout_ms=50, max_records=max_records)
            for tp, msgs in batches.items():
                for m in msgs:
                    nbytes += len(m.value)
                records += len(msgs)
                end = remaining.get(tp)
                if end is not None and msgs and msgs[-1].offset + 1 >= end:
                    del remaining[tp]
        t_end = time.perf_counter()
        cpu = time.process_time() - cpu0
    finally:
        await consumer.stop()
    assert listener.at is not None
    elapsed = t_end - listener.at
    return {
        "records": records,
        "value_bytes": nbytes,
        "seconds": round(elapsed, 3),
        "eps": round(records / elapsed),
        "join_s": round(listener.at - t_sub, 3),
        "cpu_us_per_event": round(cpu / records * 1e6, 2),
    }


async def replicator_round(
    bootstrap: str, topics: list[str], ends: dict[TopicPartition, int], workdir: Path,
    *, keep_data: bool = False,
) -> dict[str, Any]:
    """replicator.ingest.Ingestor from assignment until every partition is durable at its end."""
    gc.collect()
    data_dir = workdir / unique("data")
    cfg = replicator_config(data_dir, bootstrap, topics, unique("bench-replicator"))
    ing = Ingestor(config=cfg)
    await ing.start()
    assigned_at: list[float] = []
    orig = ing._on_assigned

    async def on_assigned(assigned: list[TopicPartition]) -> None:
        if assigned and not assigned_at:
            assigned_at.append(time.perf_counter())
        await orig(assigned)

    ing._on_assigned = on_assigned  # type: ignore[method-assign]
    want = [((tp.topic, tp.partition), end) for tp, end in ends.items() if end > 0]
    t_run = time.perf_counter()
    cpu0 = time.process_time()
    task = asyncio.create_task(ing.run())
    try:
        logs = ing.spool.logs
        while True:
            await asyncio.sleep(0.005)
            if task.done():
                task.result()
                raise RuntimeError("ingest stopped early")
            if all((p := logs.get(tp)) is not None and p.durable >= end for tp, end in want):
                break
        t_end = time.perf_counter()
        cpu = time.process_time() - cpu0
    finally:
        ing.request_stop()
        await asyncio.gather(task, return_exceptions=True)
        t_stop0 = time.perf_counter()
        await ing.stop()
        stop_s = time.perf_counter() - t_stop0
    records = ing.stats.ingested + ing.stats.quarantined
    elapsed = t_end - assigned_at[0]
    seg_bytes, seg_files = segment_bytes(data_dir)
    reg = ing.metrics.registry
    commit_n = reg.get_sample_value("replicator_fsync_seconds_count") or 0
    commit_s = reg.get_sample_value("replicator_fsync_seconds_sum") or 0.0
    out = {
        "records": records,
        "ingested": ing.stats.ingested,
        "quarantined": ing.stats.quarantined,
        "seconds": round(elapsed, 3),
        "eps": round(records / elapsed),
        "join_s": round(assigned_at[0] - t_run, 3),
        "cpu_us_per_event": round(cpu / records * 1e6, 2),
        "group_commits": ing.spool.flushes,
        "group_commit_mean_ms": round(commit_s / commit_n * 1000, 1) if commit_n else None,
        "stop_s": round(stop_s, 3),
        "segment_bytes": seg_bytes,
        "segment_files": seg_files,
    }
    if not keep_data:
        shutil.rmtree(data_dir, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- process entry


async def _prefill_main(args: argparse.Namespace) -> dict[str, Any]:
    from bench.events import load_events

    events = load_events(args.events, seed=args.seed,
                         log=lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True))
    names = {e: unique(f"bench-{e}") for e in ("attendance", "participant", "config")}
    await create_topics(args.bootstrap, list(names.values()), partitions=3)
    t0 = time.perf_counter()
    ends = await prefill(args.bootstrap, names, events)
    seconds = time.perf_counter() - t0
    return {
        "topics": list(names.values()),
        "ends": [[tp.topic, tp.partition, e] for tp, e in ends.items()],
        "events": len(events),
        "raw_value_bytes": events.value_bytes,
        "prefill_seconds": round(seconds, 1),
    }


async def _round_main(args: argparse.Namespace) -> dict[str, Any]:
    state = json.loads(Path(args.state).read_text())
    ends = {TopicPartition(t, p): e for t, p, e in state["ends"]}
    if args.kind == "baseline":
        return await baseline_round(args.bootstrap, state["topics"], ends)
    return await replicator_round(args.bootstrap, state["topics"], ends, Path(args.workdir))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ingest_bench")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prefill", help="create topics, publish events, write a state file")
    a.add_argument("--bootstrap", required=True)
    a.add_argument("--events", type=int, default=1_000_000)
    a.add_argument("--seed", type=int, default=1)
    a.add_argument("--state", required=True)
    r = sub.add_parser("round", help="one measured round; prints its JSON")
    r.add_argument("--bootstrap", required=True)
    r.add_argument("--state", required=True)
    r.add_argument("--kind", choices=("baseline", "replicator"), required=True)
    r.add_argument("--workdir", default=None)
    r.add_argument("--gc-young", type=int, default=None,
                   help="young-generation GC threshold for this process (informational runs)")
    args = p.parse_args(argv)
    if args.cmd == "prefill":
        out = asyncio.run(_prefill_main(args))
        Path(args.state).write_text(json.dumps(out))
        print(json.dumps({k: v for k, v in out.items() if k != "ends"}))
    else:
        if args.kind == "replicator" and not args.workdir:
            p.error("--workdir is required for a replicator round")
        if args.gc_young:
            t = gc.get_threshold()
            gc.set_threshold(args.gc_young, t[1], t[2])
        print(json.dumps(asyncio.run(_round_main(args))))
    return 0


def run_subprocess(*args: str) -> dict[str, Any]:
    """Run ``python -m bench.ingest_bench ARGS`` in a fresh process; its JSON result."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ingest_bench", *args], cwd=root, env=env,
        stdout=subprocess.PIPE, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench.ingest_bench {args[0]} exited {proc.returncode}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
