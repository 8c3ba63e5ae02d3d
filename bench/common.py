"""Shared pieces of the benchmarks: broker, topics, prefill, replicator config, machine info."""

from __future__ import annotations

import asyncio
import os
import platform
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import murmur2

from bench.events import EventSet
from replicator.config import Config, IngestSettings, KafkaSettings, ServerSettings

REPO_ROOT = Path(__file__).resolve().parent.parent

#: The consumer settings replicator.ingest.Ingestor uses (the baseline uses the same ones, so
#: the ratio compares per-record work, not client tuning).
INGEST_CONSUMER_OPTIONS: dict[str, Any] = {
    "enable_auto_commit": False,
    "auto_offset_reset": "earliest",
    "isolation_level": "read_committed",
    "max_partition_fetch_bytes": 16 * 1024 * 1024,
    "fetch_max_bytes": 64 * 1024 * 1024,
}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def create_topics(bootstrap: str, names: list[str], partitions: int = 3) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names]
        )
        for _ in range(200):
            if set(names) <= set(await admin.list_topics()):
                break
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError(f"topics {names} did not appear")
    finally:
        await admin.close()
    # wait until a client sees leaders for every partition
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await probe.start()
    try:
        for _ in range(200):
            await probe._client.force_metadata_update()
            parts = [probe._client.cluster.partitions_for_topic(t) or set() for t in names]
            if all(len(p) == partitions for p in parts):
                return
            await asyncio.sleep(0.1)
    finally:
        await probe.stop()


class Partitioner:
    """Kafka's default key partitioner (murmur2), memoised per key (the keys repeat)."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self._memo: dict[bytes, int] = {}

    def __call__(self, key: bytes) -> int:
        p = self._memo.get(key)
        if p is None:
            p = self._memo[key] = (murmur2(key) & 0x7FFFFFFF) % self.partitions
        return p


async def prefill(
    bootstrap: str, topics: dict[str, str], events: EventSet, *, partitions: int = 3,
    batch_bytes: int = 1024 * 1024,
) -> dict[TopicPartition, int]:
    """Publish ``events`` as fast as aiokafka can; return the end offset per partition.

    Uses ``create_batch``/``send_batch`` with 1 MiB batches, up to 32 batches in flight,
    acks=1, no compression (like ChangePublisher's defaults). Keys and headers are what
    ChangePublisher sends; partitions come from Kafka's default key partitioner.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks=1, max_batch_size=batch_bytes,
        max_request_size=16 * 1024 * 1024, linger_ms=5, compression_type=None,
    )
    await producer.start()
    try:
        part = Partitioner(partitions)
        topic_of = [topics[e] for e in events.entities]
        headers = [events.headers(i) for i in range(len(events.entities))]
        builders: dict[tuple[int, int], Any] = {}
        inflight: list[asyncio.Future[Any]] = []

        async def ship(ti: int, p: int, b: Any) -> None:
            inflight.append(await producer.send_batch(b, topic_of[ti], partition=p))
            if len(inflight) >= 32:
                await inflight.pop(0)

        idx = events.entity_idx
        keys = events.keys
        for i, value in enumerate(events.values):
            ti = idx[i]
            key = keys[i]
            slot = (ti, part(key))
            b = builders.get(slot)
            if b is None:
                b = builders[slot] = producer.create_batch()
            if b.append(key=key, value=value, timestamp=None, headers=headers[ti]) is None:
                await ship(ti, slot[1], b)
                b = builders[slot] = producer.create_batch()
                b.append(key=key, value=value, timestamp=None, headers=headers[ti])
        for (ti, p), b in builders.items():
            if b.record_count():
                await ship(ti, p, b)
        await asyncio.gather(*inflight)
    finally:
        await producer.stop()
    return await end_offsets(bootstrap, list(topics.values()), partitions)


async def end_offsets(bootstrap: str, topics: list[str], partitions: int = 3
                      ) -> dict[TopicPartition, int]:
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await c.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(partitions)]
        ends: dict[TopicPartition, int] = await c.end_offsets(tps)
        return ends
    finally:
        await c.stop()


def replicator_config(data_dir: Path, bootstrap: str, topics: list[str], group: str) -> Config:
    """The production defaults, pointed at the benchmark's broker, topics and data dir."""
    base = Config()
    return replace(
        base,
        kafka=replace(KafkaSettings(), bootstrap_servers=bootstrap, group_id=group,
                      topics=tuple(topics)),
        ingest=replace(IngestSettings(), data_dir=data_dir),
        server=ServerSettings(port=0),
    )


def segment_bytes(data_dir: Path) -> tuple[int, int]:
    """(bytes, files) of every segment file under ``data_dir`` (store and spool)."""
    total = files = 0
    for p in data_dir.rglob("*"):
        if p.is_file() and p.suffix in (".seg", ".sealed", ".active"):
            total += p.stat().st_size
            files += 1
    return total, files


def kafka_version(bootstrap_is_local: bool) -> str:
    env = os.environ.get("KAFKA_VERSION")
    stamp = REPO_ROOT / "deploy" / "kafka" / "lib" / ".fetched"
    if bootstrap_is_local and stamp.exists():
        first = stamp.read_text().splitlines()[0]
        if first.startswith("kafka_version="):
            return first.split("=", 1)[1]
    return env or "unknown (external broker)"


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    import aiokafka
    import lz4
    import orjson

    return {
        "hostname": platform.node(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_gib": mem,
        "os": platform.platform(),
        "python": platform.python_version(),
        "aiokafka": aiokafka.__version__,
        "orjson": orjson.__version__,
        "lz4": lz4.__version__,
        "loadavg_start": list(os.getloadavg()),
    }


class CpuTimer:
    """Wall and process-CPU time of a stretch of code."""

    def __enter__(self) -> CpuTimer:
        self.wall0 = time.perf_counter()
        self.cpu0 = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0
