"""Micro-benchmark of ingest's per-record work, without Kafka (not part of ``make bench``).

Builds ``aiokafka`` ``ConsumerRecord`` objects from cached demo events (with the headers
ChangePublisher sends) and times, in process CPU time, best of ``--rounds``:

* ``touch``: the baseline loop body (``len(m.value)``);
* ``check``: ``EventValidator.check`` (size, ``orjson.loads``, schema validation);
* ``process``: ``Ingestor._process`` (check + framing into the block builder) plus
  ``BlockBuilder.take`` (the join handed to the flusher).

Usage: ``.venv/bin/python -m bench.micro_ingest [--events 200000] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from bench.common import replicator_config
from bench.events import load_events
from replicator.ingest import Ingestor
from replicator.spool import PartitionLog


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=5000)
    args = p.parse_args(argv)
    ev = load_events(args.events, log=lambda *_: None)
    topic = "attendance"
    ts = int(time.time() * 1000)
    recs = []
    for i in range(len(ev)):
        ti = ev.entity_idx[i]
        # a fresh list of fresh tuples per record, like aiokafka's fetcher
        h = tuple((k, bytes(v)) for k, v in ev.headers(ti))
        key = bytes(ev.keys[i])
        recs.append(ConsumerRecord(topic, 0, i, ts + i, 0, key, ev.values[i], None,
                                   len(key), len(ev.values[i]), h))
    batches = [recs[i:i + args.batch] for i in range(0, len(recs), args.batch)]
    with tempfile.TemporaryDirectory() as d:
        cfg = replicator_config(Path(d), "127.0.0.1:1", [topic, "participant", "config"], "g")
        ing = Ingestor(config=cfg)
        # all events on one topic: skip the entity-vs-topic check like an "all" topic
        ing._topic_entity = {topic: None}
        check = ing.validator.check
        tp = TopicPartition(topic, 0)

        def touch() -> None:
            n = 0
            for b in batches:
                for m in b:
                    n += len(m.value)

        def do_check() -> None:
            for b in batches:
                for m in b:
                    check(None, m.value)

        def process() -> None:
            plog = PartitionLog(topic=topic, partition=0, settings=ing.spool.settings,
                                store=ing.store)
            plog.start_at(0)
            ing.spool.logs[(topic, 0)] = plog
            builder = plog.builder
            assert builder is not None
            for b in batches:
                ing._process(tp, b)
                if builder.pending_bytes > 4 * 1024 * 1024:
                    builder.take()
            builder.take()

        gc.collect()
        gc.freeze()
        n = len(recs)
        for name, fn in (("touch", touch), ("check", do_check), ("process", process)):
            best = float("inf")
            for _ in range(args.rounds):
                t0 = time.process_time()
                fn()
                best = min(best, time.process_time() - t0)
            print(f"{name:<8} {best / n * 1e6:6.2f} µs/record")
        ing.spool.logs.clear()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
