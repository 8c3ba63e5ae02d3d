"""End-to-end check of the local Kafka broker (deploy/kafka/kafka.sh) with aiokafka.

Run from anywhere:  .venv/bin/python deploy/kafka/smoke.py [--keep] [--workdir DIR]

It starts a fresh broker in a temporary directory and checks, with aiokafka:
  * AIOKafkaAdminClient creates a 3-partition topic;
  * an idempotent producer (enable_idempotence=True, acks='all') writes;
  * a transactional producer commits one transaction and aborts another;
  * a consumer group (enable_auto_commit=False, isolation_level='read_committed')
    sees the committed records, never the aborted ones, and commits offsets by hand;
  * a read_uncommitted consumer does see the aborted records (so they really were written);
  * a restart on the same port and data dir keeps the topic, its records and the
    group's committed offsets, and producing/consuming works afterwards;
  * stop leaves no broker process behind.
Prints timings; exits non-zero on the first failed check.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO_ROOT))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402

from tests.kafka_service import LocalBroker, fetch_jars, start_local_broker  # noqa: E402

TOPIC = "smoke-events"
GROUP = "smoke-group"
N_IDEMPOTENT = 30
N_TXN = 12


def check(cond: bool, what: str) -> None:
    if not cond:
        raise SystemExit(f"FAIL: {what}")
    print(f"  ok  {what}")


def process_gone(pid: int) -> bool:
    """No such process, or a zombie whose resources are released (awaiting its reaper)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


async def create_topic(bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, num_partitions=3, replication_factor=1)])
        topics = await admin.list_topics()
        check(TOPIC in topics, f"admin created topic {TOPIC}")
        desc = await admin.describe_topics([TOPIC])
        parts = desc[0]["partitions"]
        check(len(parts) == 3, "topic has 3 partitions")
    finally:
        await admin.close()


async def produce_idempotent(bootstrap: str, prefix: str, n: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for i in range(n):
            md = await producer.send_and_wait(TOPIC, f"{prefix}-{i}".encode(), key=f"k{i}".encode())
            assert md.offset >= 0
    finally:
        await producer.stop()
    check(True, f"idempotent producer (acks=all) wrote {n} records '{prefix}-*'")


async def produce_transactions(bootstrap: str, tag: str) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        transactional_id=f"smoke-txn-{tag}",
        enable_idempotence=True,
        acks="all",
    )
    t0 = time.monotonic()
    await producer.start()  # InitProducerId against the transaction coordinator
    init_s = time.monotonic() - t0
    try:
        async with producer.transaction():
            for i in range(N_TXN):
                await producer.send(TOPIC, f"committed-{tag}-{i}".encode(), key=f"c{i}".encode())
        check(True, f"transaction committed ({N_TXN} records, init {init_s:.2f}s)")

        await producer.begin_transaction()
        futs = [
            await producer.send(TOPIC, f"aborted-{tag}-{i}".encode(), key=f"a{i}".encode())
            for i in range(N_TXN)
        ]
        await producer.flush()
        await asyncio.gather(*futs)
        await producer.abort_transaction()
        check(True, f"transaction aborted ({N_TXN} records written then aborted)")
    finally:
        await producer.stop()


async def consume_all(
    bootstrap: str,
    *,
    group: str | None,
    isolation: str,
    expect: int,
    commit: bool = False,
    idle_s: float = 3.0,
) -> list[str]:
    consumer = AIOKafkaConsumer(
        TOPIC,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation,
    )
    await consumer.start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 45
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for recs in batch.values():
                seen.extend(r.value.decode() for r in recs)
                if recs:
                    last_new = time.monotonic()
            # once we have what we expect, linger briefly to catch extras
            if len(seen) >= expect and time.monotonic() - last_new > idle_s:
                break
            if expect == 0 and consumer.assignment() and time.monotonic() - last_new > idle_s:
                break
        if commit:
            await consumer.commit()
            for tp in sorted(consumer.assignment()):
                committed = await consumer.committed(tp)
                position = await consumer.position(tp)
                check(committed == position, f"committed offset of {tp.partition} = {committed}")
    finally:
        await consumer.stop()
    return seen


async def run_checks(broker: LocalBroker) -> None:
    bootstrap = broker.bootstrap
    print(f"broker at {bootstrap}, workdir {broker.workdir}")

    await create_topic(bootstrap)

    t0 = time.monotonic()
    await produce_idempotent(bootstrap, "idem", N_IDEMPOTENT)
    await produce_transactions(bootstrap, "one")
    print(f"  produce phase took {time.monotonic() - t0:.2f}s")

    expected = {f"idem-{i}" for i in range(N_IDEMPOTENT)} | {
        f"committed-one-{i}" for i in range(N_TXN)
    }
    seen = await consume_all(
        bootstrap, group=GROUP, isolation="read_committed", expect=len(expected), commit=True
    )
    check(len(seen) == len(set(seen)), "read_committed: no duplicates")
    check(
        set(seen) == expected, f"read_committed group consumer saw exactly {len(expected)} records"
    )
    check(not any(s.startswith("aborted-") for s in seen), "read_committed: no aborted records")

    raw = await consume_all(
        bootstrap, group=None, isolation="read_uncommitted", expect=len(expected) + N_TXN
    )
    check(
        sum(s.startswith("aborted-") for s in raw) == N_TXN,
        "read_uncommitted consumer does see the aborted records",
    )

    # ---- restart on the same port + data dir
    pid_before = broker.pid
    t0 = time.monotonic()
    broker.restart()
    restart_s = time.monotonic() - t0
    check(broker.bootstrap == bootstrap, f"restart kept bootstrap {bootstrap}")
    check(broker.pid not in (None, pid_before), f"restart gave a new JVM (pid {broker.pid})")
    print(f"  restart (stop + start-existing) took {restart_s:.2f}s")

    again = await consume_all(
        bootstrap, group=None, isolation="read_committed", expect=len(expected)
    )
    check(set(again) == expected, "after restart the topic still holds every committed record")

    nothing = await consume_all(
        bootstrap, group=GROUP, isolation="read_committed", expect=0, idle_s=2.0
    )
    check(nothing == [], "after restart the group resumes at its committed offsets")

    await produce_idempotent(bootstrap, "post", 5)
    await produce_transactions(bootstrap, "two")
    fresh = await consume_all(
        bootstrap, group=GROUP, isolation="read_committed", expect=5 + N_TXN, commit=True
    )
    check(
        set(fresh)
        == {f"post-{i}" for i in range(5)} | {f"committed-two-{i}" for i in range(N_TXN)},
        "after restart: produce + transactions + group consume work",
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", type=Path, help="broker dir (default: a fresh temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the broker dir afterwards")
    args = ap.parse_args()

    t0 = time.monotonic()
    fetch_jars()
    print(f"jars ready in {time.monotonic() - t0:.2f}s (deploy/kafka/lib)")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kafka-smoke-"))
    t0 = time.monotonic()
    broker = start_local_broker(workdir)
    cold = time.monotonic() - t0
    print(f"cold start (config + format + JVM + ready): {cold:.2f}s")
    ok = False
    try:
        asyncio.run(run_checks(broker))
        ok = True
    finally:
        pid = broker.pid
        t0 = time.monotonic()
        broker.stop()
        print(f"stop took {time.monotonic() - t0:.2f}s")
        if pid is not None:
            check(process_gone(pid), f"broker process {pid} is gone after stop")
        check(not broker.is_running(), "status reports stopped")
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not ok:
            print(f"broker logs kept in {workdir / 'logs'}")
    print("SMOKE OK" if ok else "SMOKE FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
