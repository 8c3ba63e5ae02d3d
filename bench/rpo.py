"""Section ``rpo``: publish-ack -> durable latency at a steady event rate.

Two processes (more realistic on a small machine than sharing one event loop):

* the **publisher** (``python -m bench.rpo --publisher ...``, this module) sends pre-serialised
  demo events at a steady rate with an ``AIOKafkaProducer`` configured like
  ``ChangePublisher`` (acks=all, idempotent, no compression): every 5 ms tick the events due
  are put into one batch per partition (``create_batch``/``send_batch``: per-message
  ``send()`` cannot sustain 20k/s next to a broker and a replicator on 2 cores) and the
  ``time.monotonic()`` at which each batch's ack arrived is recorded (a done callback on the
  batch future) for every offset in it;
* the **replicator** (``replicator.ingest.Ingestor`` with the production defaults) runs in the
  benchmark process. Its durability moments are observed by wrapping
  ``PartitionLog.block_durable`` in this process only (no change to replicator code): it is
  called by ``Spool.flush`` right after the group commit's fsync returned, with the block
  whose records just became durable.

``CLOCK_MONOTONIC`` is system-wide on Linux, so the two processes' timestamps compare.
Latency of an offset = moment its block became durable - moment its ack arrived; negatives
(the replicator fsync'd the record before the producer saw the ack) are clamped to 0 and
counted.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import gc
import json
import pickle
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import Partitioner, create_topics, replicator_config, segment_bytes, unique
from bench.events import load_events

# --------------------------------------------------------------------------- publisher side


async def _publish(args: argparse.Namespace) -> dict[str, Any]:
    from aiokafka import AIOKafkaProducer

    total = int(args.rate * args.seconds)
    events = load_events(args.events, seed=args.seed, log=lambda *_: None).slice(total)
    topics = json.loads(args.topics)  # entity -> topic
    topic_of = [topics[e] for e in events.entities]
    headers = [events.headers(i) for i in range(len(events.entities))]
    part = Partitioner(args.partitions)
    parts = [part(k) for k in events.keys]
    gc.collect()
    gc.freeze()  # the pre-serialised events: keep the collector's full passes short
    producer = AIOKafkaProducer(
        bootstrap_servers=args.bootstrap, acks="all", enable_idempotence=True,
        max_request_size=16 * 1024 * 1024, max_batch_size=256 * 1024,
    )
    await producer.start()
    mono = time.monotonic
    # one entry per acknowledged batch: (topic idx, partition, base offset, records, ack time)
    acks: list[tuple[int, int, int, int, float]] = []
    errors = 0

    def on_done(ti: int, p: int, n: int) -> Any:
        def cb(fut: asyncio.Future[Any]) -> None:
            nonlocal errors
            t = mono()
            if fut.cancelled() or fut.exception() is not None:
                errors += n
                return
            acks.append((ti, p, fut.result().offset, n, t))
        return cb

    try:
        idx, keys, values = events.entity_idx, events.keys, events.values
        rate = args.rate
        sent = 0
        max_lag = 0
        inflight: set[asyncio.Future[Any]] = set()
        origin = mono()
        while sent < total:
            due = min(total, int((mono() - origin) * rate) + 1)
            max_lag = max(max_lag, due - sent)
            builders: dict[tuple[int, int], Any] = {}
            full: list[tuple[tuple[int, int], Any]] = []
            for i in range(sent, due):
                ti = idx[i]
                slot = (ti, parts[i])
                b = builders.get(slot)
                if b is None:
                    b = builders[slot] = producer.create_batch()
                if b.append(key=keys[i], value=values[i], timestamp=None,
                            headers=headers[ti]) is None:
                    full.append((slot, b))
                    b = builders[slot] = producer.create_batch()
                    b.append(key=keys[i], value=values[i], timestamp=None, headers=headers[ti])
            sent = due
            for (ti, p), b in [*full, *builders.items()]:
                fut = await producer.send_batch(b, topic_of[ti], partition=p)
                fut.add_done_callback(on_done(ti, p, b.record_count()))
                inflight.add(fut)
                fut.add_done_callback(inflight.discard)
            # a tick every ~5 ms (like linger_ms=5): steady rate, small batches
            await asyncio.sleep(0.005)
        t_last_send = mono()
        if inflight:
            await asyncio.wait(inflight)
        await asyncio.sleep(0.05)  # let the last done callbacks run
    finally:
        await producer.stop()
    with open(args.out, "wb") as f:
        pickle.dump({"topics": topic_of, "acks": acks}, f, protocol=pickle.HIGHEST_PROTOCOL)
    return {
        "sent": sent,
        "value_bytes": sum(map(len, values[:sent])),
        "acked": sum(a[3] for a in acks),
        "errors": errors,
        "publish_seconds": round(t_last_send - origin, 3),
        "achieved_rate": round(sent / (t_last_send - origin)),
        "max_send_backlog": max_lag,
    }


def publisher_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rpo --publisher")
    p.add_argument("--publisher", action="store_true")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topics", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--events", type=int, required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--partitions", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    summary = asyncio.run(_publish(args))
    print(json.dumps(summary), flush=True)
    return 0


# --------------------------------------------------------------------------- replicator side


def _percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, max(0, round(q / 100 * (len(sorted_vals) - 1))))
    return sorted_vals[k]


Marks = dict[tuple[str, int], tuple[list[int], list[float]]]


def _marks() -> Marks:
    """Per partition: ascending end offsets and the moment everything below each was reached."""
    return defaultdict(lambda: ([], []))


def _mark(marks: Marks, topic: str, partition: int, end: int, t: float) -> None:
    ends, times = marks[(topic, partition)]
    ends.append(end)
    times.append(t)


def _when(marks: Marks, tp: tuple[str, int], off: int) -> float:
    ends, times = marks[tp]
    return times[bisect.bisect_right(ends, off)]


async def _publish_process(
    bootstrap: str, workdir: Path, names: dict[str, str], *, rate: float, seconds: float,
    events_n: int, seed: int, tag: str,
) -> tuple[dict[str, Any], list[str], list[tuple[int, int, int, int, float]]]:
    acks_path = workdir / f"rpo-acks-{tag}.pickle"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.rpo", "--publisher", "--bootstrap", bootstrap,
        "--topics", json.dumps(names), "--rate", str(rate), "--seconds", str(seconds),
        "--events", str(events_n), "--seed", str(seed), "--out", str(acks_path),
        stdout=asyncio.subprocess.PIPE, cwd=str(Path(__file__).resolve().parent.parent),
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"rpo publisher exited {proc.returncode}")
    pub = json.loads(out.decode().strip().splitlines()[-1])
    with open(acks_path, "rb") as f:
        acked = pickle.load(f)
    acks_path.unlink()
    return pub, acked["topics"], acked["acks"]


def _ends(topic_of: list[str], acks: list[tuple[int, int, int, int, float]]
          ) -> dict[tuple[str, int], int]:
    need: dict[tuple[str, int], int] = {}
    for ti, p, base, n, _ in acks:
        tp = (topic_of[ti], p)
        need[tp] = max(need.get(tp, 0), base + n)
    return need


async def _topics(bootstrap: str, tag: str) -> dict[str, str]:
    names = {e: unique(f"rpo-{tag}-{e}") for e in ("attendance", "participant", "config")}
    await create_topics(bootstrap, list(names.values()), partitions=3)
    return names


def _measured(acks: list[tuple[int, int, int, int, float]], warmup: float
              ) -> list[tuple[int, int, int, int, float]]:
    """The acks after the warm-up: the first ``warmup`` seconds of publishing (a broker's
    JIT, first fetches and allocations) are published and consumed but not measured."""
    if not acks or warmup <= 0:
        return acks
    start = min(a[4] for a in acks) + warmup
    return [a for a in acks if a[4] >= start]


async def baseline_run(
    bootstrap: str, workdir: Path, *, rate: float, seconds: float, events_n: int, seed: int,
    warmup: float = 0.0,
) -> dict[str, Any]:
    """The same publisher, read by a bare aiokafka consume loop (read_committed, the
    replicator's fetch settings, no processing): the latency floor this machine gives for
    ack -> records in the consumer's hands, with the broker and the publisher on the same
    cores."""
    from aiokafka import AIOKafkaConsumer

    from replicator.config import KafkaSettings

    k = KafkaSettings()
    names = await _topics(bootstrap, "base")
    consumer = AIOKafkaConsumer(
        *names.values(), bootstrap_servers=bootstrap, group_id=unique("bench-rpo-base"),
        enable_auto_commit=False, auto_offset_reset="earliest",
        isolation_level="read_committed", max_partition_fetch_bytes=16 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024, fetch_min_bytes=k.fetch_min_bytes,
        fetch_max_wait_ms=k.fetch_max_wait_ms,
    )
    fetched = _marks()
    mono = time.monotonic

    async def fetch() -> None:
        """One getmany; note when each partition's records were handed over."""
        batches = await consumer.getmany(timeout_ms=50, max_records=k.max_poll_records)
        t = mono()
        for tp, msgs in batches.items():
            _mark(fetched, tp.topic, tp.partition, msgs[-1].offset + 1, t)

    await consumer.start()
    try:
        deadline = mono() + 60
        while len(consumer.assignment()) < 9:
            if mono() > deadline:
                raise RuntimeError("baseline consumer did not get its partitions")
            await consumer.getmany(timeout_ms=100)
        pub_task = asyncio.create_task(_publish_process(
            bootstrap, workdir, names, rate=rate, seconds=seconds + warmup, events_n=events_n,
            seed=seed, tag="base"))
        while not pub_task.done():
            await fetch()
        pub, topic_of, acks = pub_task.result()
        need = _ends(topic_of, acks)
        deadline = mono() + 60
        while not all(fetched[tp][0] and fetched[tp][0][-1] >= end for tp, end in need.items()):
            if mono() > deadline:
                raise RuntimeError("baseline consumer did not reach the acked offsets")
            await fetch()
    finally:
        await consumer.stop()
    lat: list[float] = []
    for ti, p, base, n, t_ack in _measured(acks, warmup):
        tp = (topic_of[ti], p)
        lat.extend(max(0.0, _when(fetched, tp, off) - t_ack) * 1000
                   for off in range(base, base + n))
    lat.sort()
    return {
        "rate_achieved": pub["achieved_rate"],
        "events": pub["sent"],
        "measured_events": len(lat),
        "fetch_p50_ms": round(_percentile(lat, 50), 1),
        "fetch_p99_ms": round(_percentile(lat, 99), 1),
        "fetch_max_ms": round(lat[-1], 1) if lat else None,
    }


async def replicator_run(
    bootstrap: str, workdir: Path, *, rate: float, seconds: float, events_n: int, seed: int,
    warmup: float = 0.0, log: Any = print,
) -> dict[str, Any]:
    from replicator.ingest import Ingestor
    from replicator.spool import PartitionLog

    names = await _topics(bootstrap, "repl")
    data_dir = workdir / unique("rpo-data")
    cfg = replicator_config(data_dir, bootstrap, list(names.values()), unique("bench-rpo"))
    mono = time.monotonic
    durable = _marks()  # fsync of the group commit returned
    fetched = _marks()  # the client handed the records to the replicator (getmany)
    orig_block_durable = PartitionLog.block_durable
    orig_process = Ingestor._process

    def block_durable(self: PartitionLog, block: Any, now_mono: float) -> None:
        orig_block_durable(self, block, now_mono)
        if block.records:  # durable when the group commit's fsyncs returned (worker thread)
            _mark(durable, self.topic, self.partition, block.end, ing.spool.last_sync_mono)

    def process(self: Ingestor, tp: Any, msgs: list[Any]) -> None:
        if msgs:
            _mark(fetched, tp.topic, tp.partition, msgs[-1].offset + 1, mono())
        orig_process(self, tp, msgs)

    PartitionLog.block_durable = block_durable  # type: ignore[method-assign]
    Ingestor._process = process  # type: ignore[method-assign]
    ing = Ingestor(config=cfg)
    try:
        await ing.start()
        task = asyncio.create_task(ing.run())
        deadline = time.monotonic() + 60
        while not ing.ready or len(ing.spool.logs) < 9:
            if task.done():
                task.result()
            if time.monotonic() > deadline:
                raise RuntimeError("replicator did not get its partitions")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # settle: first fetches in flight
        log(f"rpo: publishing {rate:,.0f} events/s for {warmup:.0f}s + {seconds:.0f}s "
            "to the replicator")
        pub, topic_of, acks = await _publish_process(
            bootstrap, workdir, names, rate=rate, seconds=seconds + warmup, events_n=events_n,
            seed=seed, tag="repl")
        need = _ends(topic_of, acks)
        deadline = time.monotonic() + 60
        logs = ing.spool.logs
        while not all((pl := logs.get(tp)) is not None and pl.durable >= end
                      for tp, end in need.items()):
            if task.done():
                task.result()
            if time.monotonic() > deadline:
                raise RuntimeError("acked events did not become durable within 60 s")
            await asyncio.sleep(0.01)
        ing.request_stop()
        await task
    finally:
        PartitionLog.block_durable = orig_block_durable  # type: ignore[method-assign]
        Ingestor._process = orig_process  # type: ignore[method-assign]
        await ing.stop()
    lat: list[float] = []
    to_fetch: list[float] = []  # ack -> handed to the replicator by the client
    to_durable: list[float] = []  # handed over -> fsync'd
    before_ack = 0
    for ti, p, base, n, t_ack in _measured(acks, warmup):
        tp = (topic_of[ti], p)
        for off in range(base, base + n):
            t_dur = _when(durable, tp, off)
            t_fetch = _when(fetched, tp, off)
            d = t_dur - t_ack
            if d < 0:
                before_ack += 1
                d = 0.0
            lat.append(d * 1000)
            to_fetch.append(max(0.0, t_fetch - t_ack) * 1000)
            to_durable.append((t_dur - t_fetch) * 1000)
    lat.sort()
    to_fetch.sort()
    to_durable.sort()
    seg_bytes, _ = segment_bytes(data_dir)
    raw = pub["value_bytes"]
    return {
        "rate_target": rate,
        "rate_achieved": pub["achieved_rate"],
        "publish_seconds": pub["publish_seconds"],
        "events": pub["sent"],
        "acked": pub["acked"],
        "warmup_s": warmup,
        "measured_events": len(lat),
        "publish_errors": pub["errors"],
        "rpo_p50_ms": round(_percentile(lat, 50), 1),
        "rpo_p90_ms": round(_percentile(lat, 90), 1),
        "rpo_p99_ms": round(_percentile(lat, 99), 1),
        "rpo_p999_ms": round(_percentile(lat, 99.9), 1),
        "rpo_max_ms": round(lat[-1], 1) if lat else None,
        "rpo_mean_ms": round(sum(lat) / len(lat), 1) if lat else None,
        "ack_to_fetched_p50_ms": round(_percentile(to_fetch, 50), 1),
        "ack_to_fetched_p99_ms": round(_percentile(to_fetch, 99), 1),
        "fetched_to_durable_p50_ms": round(_percentile(to_durable, 50), 1),
        "fetched_to_durable_p99_ms": round(_percentile(to_durable, 99), 1),
        "durable_before_ack": before_ack,
        "group_commits": ing.spool.flushes,
        "bytes_per_event": round(seg_bytes / raw, 4) if raw else None,
        "publisher": "separate process; AIOKafkaProducer acks=all, idempotent, no compression; "
                     "send_batch per partition every 5 ms tick",
    }


async def rpo_section(
    bootstrap: str, workdir: Path, *, rate: float, seconds: float, events_n: int, seed: int,
    warmup: float = 0.0, log: Any = print,
) -> dict[str, Any]:
    """The replicator run, then the bare-consumer baseline with the same publisher."""
    out = await replicator_run(bootstrap, workdir, rate=rate, seconds=seconds,
                               events_n=events_n, seed=seed, warmup=warmup, log=log)
    log(f"rpo: publishing {rate:,.0f} events/s for {warmup:.0f}s + {seconds:.0f}s to a bare "
        "consumer")
    base = await baseline_run(bootstrap, workdir, rate=rate, seconds=seconds,
                              events_n=events_n, seed=seed, warmup=warmup)
    out["baseline"] = base
    out["baseline_note"] = ("bare aiokafka consumer, same publisher, fetch settings and "
                            "machine: ack -> records returned by getmany")
    return out


def section_main(argv: list[str]) -> int:
    """``python -m bench.rpo --section ...``: the whole section in this (fresh) process."""
    p = argparse.ArgumentParser(prog="python -m bench.rpo --section")
    p.add_argument("--section", action="store_true")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--events", type=int, required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--warmup", type=float, default=0.0)
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    out = asyncio.run(rpo_section(args.bootstrap, Path(args.workdir), rate=args.rate,
                                  seconds=args.seconds, events_n=args.events, seed=args.seed,
                                  warmup=args.warmup, log=log))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    if "--section" in sys.argv[1:]:
        sys.exit(section_main(sys.argv[1:]))
    sys.exit(publisher_main(sys.argv[1:]))
